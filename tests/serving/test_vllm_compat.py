"""vLLM's endpoints end to end (gateway + one worker process): load an adapter from the operator's
allow-list with an admin key, serve it, unload it, then 404; /tokenize, /detokenize, /version,
/v1/models/{id} and max_model_len."""

import shutil

import httpx
import pytest
from serving_cluster import one_worker_cluster, wait_until

pytestmark = pytest.mark.timeout(240)
ADMIN, ALICE = "key-admin", "key-alice"


@pytest.fixture(scope="module")
def cluster(valkey, tiny_assets, tmp_path_factory):
    model, data = tiny_assets
    root = tmp_path_factory.mktemp("vllm")
    logs = root / "logs"
    logs.mkdir()
    (root / "data" / "adapters").mkdir(parents=True)
    shutil.copytree(data / "adapters" / "alpha", root / "allowed" / "alpha")
    shutil.copytree(data / "adapters" / "alpha", root / "elsewhere" / "alpha")
    gateway_env = {"ADAPTERD_BASE_MODEL_PATH": str(model), "ADAPTERD_API_KEYS": f"{ALICE}:alice",
                   "ADAPTERD_ADMIN_KEYS": ADMIN, "ADAPTERD_ADAPTER_ALLOW_DIRS": str(root / "allowed")}
    with one_worker_cluster(f"{valkey.connection_url}/12", (model, root / "data"), logs, "wv",
                            worker_args=("--max-seq", "384"), gateway_env=gateway_env) as c:
        yield c


def call(cluster, method, path, key=ALICE, **kw) -> httpx.Response:
    return httpx.request(method, cluster.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def base_id(cluster) -> str:
    return httpx.get(cluster.url + "/ready").json()["model"]


def complete(cluster, model: str) -> httpx.Response:
    return call(cluster, "POST", "/v1/completions",
                json={"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": True})


def test_load_serve_unload_then_404(cluster):
    allowed, elsewhere = cluster.data_dir.parent / "allowed" / "alpha", cluster.data_dir.parent / "elsewhere" / "alpha"
    body = {"lora_name": "sql-lora", "lora_path": str(allowed)}
    assert call(cluster, "POST", "/v1/load_lora_adapter", json=body).status_code == 403  # a tenant key
    r = call(cluster, "POST", "/v1/load_lora_adapter", ADMIN, json=body | {"lora_path": str(elsewhere)})
    assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
    escape = str(allowed / ".." / ".." / "elsewhere" / "alpha")
    assert call(cluster, "POST", "/v1/load_lora_adapter", ADMIN, json=body | {"lora_path": escape}).status_code == 403
    (allowed.parent / "linked").symlink_to(elsewhere)  # a symlink out of the allow-list
    linked = call(cluster, "POST", "/v1/load_lora_adapter", ADMIN,
                  json=body | {"lora_path": str(allowed.parent / "linked")})
    assert linked.status_code == 403 and str(elsewhere) not in linked.text
    assert complete(cluster, "admin/sql-lora").status_code == 404

    r = call(cluster, "POST", "/v1/load_lora_adapter", ADMIN, json=body)
    assert r.status_code == 200, r.text
    assert "sql-lora" in r.text
    # warmed: the worker holds it (its heartbeat says so) before any request asked for it
    def resident() -> bool:
        workers = call(cluster, "GET", "/v1/workers", ADMIN).json()["data"]
        return any(a.startswith("admin/sql-lora@") for w in workers for a in w["resident_adapters"])
    wait_until(resident, 30, "the adapter to be resident")
    # public in the operator's namespace: tenants use its full name
    served = complete(cluster, "admin/sql-lora")
    assert served.status_code == 200, served.text
    base = complete(cluster, base_id(cluster)).json()["choices"][0]["text"]
    assert served.json()["choices"][0]["text"] != base  # the adapter is applied
    assert any(m["id"] == "admin/sql-lora" for m in call(cluster, "GET", "/v1/models").json()["data"])

    assert call(cluster, "POST", "/v1/unload_lora_adapter", json={"lora_name": "sql-lora"}).status_code == 403
    r = call(cluster, "POST", "/v1/unload_lora_adapter", ADMIN, json={"lora_name": "sql-lora"})
    assert r.status_code == 200, r.text
    assert complete(cluster, "admin/sql-lora").status_code == 404
    assert call(cluster, "POST", "/v1/unload_lora_adapter", ADMIN, json={"lora_name": "sql-lora"}).status_code == 404


def test_tokenize_detokenize_version_and_model_cards(cluster, tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets[0])
    r = call(cluster, "POST", "/tokenize", json={"model": base_id(cluster), "prompt": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(tok.encode("hello world")), "max_model_len": 384,
                        "tokens": tok.encode("hello world")}
    chat = call(cluster, "POST", "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False)
    spans = call(cluster, "POST", "/tokenize", json={"inputs": "hello world"}).json()  # TGI/LoRAX's shape
    assert [s["id"] for s in spans] == tok.encode("hello world")
    assert "".join(s["text"] for s in spans) == "hello world" and spans[0]["start"] == 0 and spans[-1]["stop"] == 11
    r = call(cluster, "POST", "/detokenize", json={"tokens": tok.encode("hello world")})
    assert r.json() == {"prompt": tok.decode(tok.encode("hello world"))}
    assert call(cluster, "POST", "/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    r = call(cluster, "POST", "/tokenize", json={"prompt": "x", "bogus": 1})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "bogus"
    assert call(cluster, "POST", "/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.get(cluster.url + "/version").json()["version"]
    cards = call(cluster, "GET", "/v1/models").json()["data"]
    assert cards and all(c["max_model_len"] == 384 for c in cards)
    one = call(cluster, "GET", f"/v1/models/{base_id(cluster)}")
    assert one.status_code == 200 and one.json()["id"] == base_id(cluster) and one.json()["max_model_len"] == 384
    assert call(cluster, "GET", "/v1/models/no-such-model").status_code == 404
