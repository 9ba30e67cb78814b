"""LoRAX's own client (`lorax-client==0.6.3`, unmodified) against the gateway + one worker: generate,
generate_stream, an adapter by adapter_id, a merge by LoRAX's names; the fields it always sends are
accepted at their defaults and refused with a 400 naming them otherwise. lorax-client pins old
huggingface-hub/certifi, so it lives in its own venv (created once under ~/.cache/adapterd; needs PyPI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_cluster import one_worker_cluster

pytestmark = pytest.mark.timeout(600)
VENV = Path(os.environ.get("ADAPTERD_LORAX_CLIENT_VENV", Path.home() / ".cache/adapterd/lorax-client-venv"))

SCRIPT = r'''
import json, sys
from lorax import Client
from lorax.errors import BadRequestError
from lorax.types import MergedAdapters
url, base = sys.argv[1], sys.argv[2]
c = Client(url, timeout=120)
out = {}
r = c.generate("hello world", max_new_tokens=5, ignore_eos_token=True)
out["plain"] = {"text": r.generated_text, "reason": r.details.finish_reason.value,
                "generated": r.details.generated_tokens, "prompt_tokens": r.details.prompt_tokens,
                "logprobs": [t.logprob for t in r.details.tokens], "prefill": len(r.details.prefill)}
out["stream"] = [(t.token.text, t.generated_text) for t in c.generate_stream("hello world", max_new_tokens=5,
                                                                             ignore_eos_token=True)]
out["adapter"] = c.generate("hello world", adapter_id="alpha", adapter_source="local", max_new_tokens=5,
                            ignore_eos_token=True).generated_text
merge = MergedAdapters(ids=["alpha", "beta"], weights=[0.6, 0.4], merge_strategy="ties", density=0.5,
                       majority_sign_method="total")
out["merge"] = c.generate("hello world", merged_adapters=merge, max_new_tokens=5, ignore_eos_token=True).generated_text
r = c.generate("hello world", max_new_tokens=3, ignore_eos_token=True, return_k_alternatives=3,
               repetition_penalty=1.3, typical_p=0.9, do_sample=True, seed=1, truncate=2)
out["alts"] = [[a.logprob for a in t.alternative_tokens] for t in r.details.tokens]
out["truncated_prompt_tokens"] = r.details.prompt_tokens
errors = {}
for name, kw in {"adapter_source": {"adapter_id": "alpha", "adapter_source": "hub"}, "watermark": {"watermark": True},
                 "api_token": {"api_token": "x"}, "decoder_input_details": {"decoder_input_details": True},
                 "best_of": {"best_of": 2, "do_sample": True}}.items():
    try:
        c.generate("hello", max_new_tokens=2, **kw)
        errors[name] = "accepted"
    except BadRequestError as e:
        errors[name] = str(e)
out["errors"] = errors
print(json.dumps(out))
'''


@pytest.fixture(scope="session")
def lorax_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "lorax-client==0.6.3"], check=True, timeout=600)
    return python


@pytest.fixture(scope="module")
def cluster(valkey, tiny_assets, tmp_path_factory):
    with one_worker_cluster(f"{valkey.connection_url}/13", tiny_assets, tmp_path_factory.mktemp("logs"), "wl") as c:
        yield c


def native(cluster, parameters: dict) -> dict:
    r = httpx.post(cluster.url + "/generate", json={"inputs": "hello world", "parameters": parameters}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_lorax_client_unmodified(cluster, lorax_python, tiny_assets):
    from transformers import AutoTokenizer

    base = httpx.get(cluster.url + "/ready").json()["model"]
    run = subprocess.run([str(lorax_python), "-c", SCRIPT, cluster.url, base], capture_output=True, text=True,
                         timeout=300, env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    greedy = {"max_new_tokens": 5, "ignore_eos_token": True}
    plain = out["plain"]
    assert plain["text"] == native(cluster, greedy)["generated_text"]
    assert plain["reason"] == "length" and plain["generated"] == 5 and plain["prefill"] == 0
    assert plain["prompt_tokens"] == len(AutoTokenizer.from_pretrained(tiny_assets[0]).encode("hello world"))
    assert all(isinstance(lp, float) and lp <= 0 for lp in plain["logprobs"])
    assert "".join(t for t, _ in out["stream"]) == plain["text"] and out["stream"][-1][1] == plain["text"]
    assert out["adapter"] == native(cluster, greedy | {"adapter_id": "alpha"})["generated_text"] != plain["text"]
    merged = {"ids": ["alpha", "beta"], "weights": [0.6, 0.4], "strategy": "ties", "density": 0.5}
    assert out["merge"] == native(cluster, greedy | {"merged_adapters": merged})["generated_text"]
    assert len(out["alts"]) == 3 and all(len(a) == 3 and a == sorted(a, reverse=True) for a in out["alts"])
    assert out["truncated_prompt_tokens"] == 2
    for name, message in out["errors"].items():
        assert message != "accepted" and name in message, (name, message)


def test_native_response_format_gives_valid_json(cluster):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["ok", "n"], "additionalProperties": False}
    out = native(cluster, {"max_new_tokens": 200, "do_sample": True, "seed": 3,
                           "response_format": {"type": "json_object", "schema": schema}})
    import jsonschema

    jsonschema.validate(json.loads(out["generated_text"]), schema)


def test_native_fields_not_honoured_are_400_naming_them(cluster):
    bad_schema = {"response_format": {"type": "json_object", "schema": {"type": "bogus"}}}
    for params, field in [(bad_schema, "response_format"),
                          ({"adapter_id": "alpha", "adapter_source": "hub"}, "adapter_source"),
                          ({"return_k_alternatives": 21}, "return_k_alternatives"),
                          ({"best_of": 2}, "best_of"), ({"watermark": True}, "watermark")]:
        r = httpx.post(cluster.url + "/generate", json={"inputs": "x", "parameters": params}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    r = httpx.post(cluster.url + "/generate", json={"inputs": "x", "parameters": {"bogus": 1}}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "parameters.bogus"
    r = httpx.post(cluster.url + "/", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200 and isinstance(r.json(), list) and r.json()[0]["generated_text"] is not None
    info = httpx.get(cluster.url + "/info", timeout=30).json()
    assert info["model_id"] and info["max_total_tokens"]
