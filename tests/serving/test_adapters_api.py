"""The adapters API through HTTP on a real cluster (Redis, gateway, one worker, the tiny model): uploads
of peft-saved adapters serve what peft computes, versions and aliases, download into peft, ComPEFT,
refused uploads that leave the store unchanged, tenant isolation, and the CLI."""

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
import redis
import torch
from adapterd_client import Client, NotFoundError, PermissionDeniedError
from serving_cluster import Cluster, ready_workers, start_gateway, start_worker, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
from tiny_models import make_lora  # noqa: E402

pytestmark = pytest.mark.timeout(180)
ALICE, BOB = "key-alice", "key-bob"
PROMPT = "the quick brown fox"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def cluster(valkey, tiny_assets, tmp_path_factory):
    model, _ = tiny_assets
    redis_url = f"{valkey.connection_url}/3"
    redis.Redis.from_url(redis_url).flushdb()
    root = tmp_path_factory.mktemp("adapters-api")
    logs = root / "logs"
    logs.mkdir()
    worker = start_worker("wx", model, redis_url, logs, data_dir=root / "data")
    gateway = start_gateway(redis_url, root / "data", logs, ADAPTERD_BASE_MODEL_PATH=str(model),
                            ADAPTERD_API_KEYS=f"{ALICE}:alice,{BOB}:bob", ADAPTERD_STORE_GC_GRACE_S="0",
                            ADAPTERD_MAX_ADAPTER_RANK="16", ADAPTERD_MAX_UPLOAD_BYTES=str(8 * 1024 * 1024))
    c = Cluster(gateway, [worker], root / "data", redis_url, logs)
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1, 90, "one worker", [gateway, worker])
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def loras(tiny_assets, tmp_path_factory):
    model, _ = tiny_assets
    root = tmp_path_factory.mktemp("loras")
    return {
        "v1": make_lora(model, root / "v1", r=4, seed=1),
        "v2": make_lora(model, root / "v2", r=8, seed=2, targets=("q_proj", "v_proj", "down_proj")),
        "big_rank": make_lora(model, root / "big", r=32, seed=3),
    }


def client(cluster, key=ALICE) -> Client:
    return Client(cluster.url, key, timeout=60, max_retries=0)


def served(cluster, model: str | None, key=ALICE, merged: dict | None = None) -> list[int]:
    """Greedy token ids from the cluster (native /generate with details), of an adapter or a merge."""
    which = {"merged_adapters": merged} if merged is not None else {"adapter_id": model}
    params = {**which, "max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos": True}
    r = httpx.post(cluster.url + "/generate", headers={"authorization": f"Bearer {key}"}, timeout=60,
                   json={"inputs": PROMPT, "parameters": params})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def peft_greedy(model_dir: Path, adapter_dir: Path) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def store_state(cluster) -> list[str]:
    store = cluster.data_dir / "store"
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and ".tmp" not in p.parts)


def unzip(data: bytes, into: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        z.extractall(into)
    return into


def test_peft_adapter_serves_what_peft_computes_with_versions_and_aliases(cluster, loras, tiny_assets):
    model, _ = tiny_assets
    with client(cluster) as c:
        v1 = c.upload_adapter("support", loras["v1"])
        assert [v.id for v in v1.versions] == ["support@1"] and v1.owner == "alice"
        assert served(cluster, "support") == peft_greedy(model, loras["v1"])
        v2 = c.upload_adapter("support", loras["v2"])
        assert v2.latest == 2 and v2.versions[-1].rank == 8
        assert served(cluster, "support") == served(cluster, "support@2") == peft_greedy(model, loras["v2"])
        assert served(cluster, "support@1") == peft_greedy(model, loras["v1"])
        assert served(cluster, "support@latest") == served(cluster, "support@2")
        models = {m.id for m in c.models().data}
        assert {"support", "support@1", "support@2"} <= models
        info = c.get_adapter("support")
        assert [v.version for v in info.versions] == [1, 2] and info.versions[0].compression_ratio == 1.0


def test_download_round_trips_into_peft(cluster, loras, tiny_assets, tmp_path):
    model, _ = tiny_assets
    with client(cluster) as c:
        c.upload_adapter("roundtrip", loras["v1"])
        folder = unzip(c.download_adapter("roundtrip@1"), tmp_path / "dl")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    original = (loras["v1"] / "adapter_model.safetensors").read_bytes()
    assert (folder / "adapter_model.safetensors").read_bytes() == original
    assert peft_greedy(model, folder) == peft_greedy(model, loras["v1"])


def test_archives_and_single_file_forms_upload(cluster, loras, tmp_path):
    folder = loras["v1"]
    zipped, tarred = tmp_path / "a.zip", tmp_path / "a.tar.gz"
    with zipfile.ZipFile(zipped, "w") as z:
        for p in folder.iterdir():
            z.write(p, f"my-adapter/{p.name}")
    with tarfile.open(tarred, "w:gz") as t:
        t.add(folder, arcname="my-adapter")
    with client(cluster) as c:
        assert c.upload_adapter("zipped", zipped).latest == 1
        assert c.upload_adapter("tarred", tarred).latest == 1
        one = c.upload_adapter("single", folder / "adapter_model.safetensors", folder / "adapter_config.json")
        assert one.versions[0].kind == "lora"
    assert served(cluster, "zipped") == served(cluster, "tarred") == served(cluster, "single")


def test_compeft_compression_serves_the_decoded_lora(cluster, loras, tiny_assets, tmp_path):
    model, _ = tiny_assets
    with client(cluster) as c:
        info = c.upload_adapter("packed", loras["v2"], compression={"method": "compeft", "density": 0.2, "alpha": 1.0})
        v = info.versions[0]
        assert v.kind == "compeft" and v.compression_ratio > 4 and v.compression["density"] == 0.2
        folder = unzip(c.download_adapter("packed"), tmp_path / "packed")
        assert served(cluster, "packed") == peft_greedy(model, folder)  # the decoded LoRA, as peft runs it
        # an already-compressed upload in the documented format is accepted as is
        from adapters_store.backends import LocalBackend
        from adapters_store.version_store import VersionStore

        store = VersionStore(LocalBackend(cluster.data_dir / "store"))
        manifest = store.resolve("alice/packed")
        pre = tmp_path / "pre"
        pre.mkdir()
        (pre / "adapter_config.json").write_bytes(store.read_file(manifest, "adapter_config.json"))
        (pre / "adapter_model.compeft").write_bytes(store.read_file(manifest, "adapter_model.compeft"))
        again = c.upload_adapter("prepacked", pre)
        assert again.versions[0].kind == "compeft"
    assert served(cluster, "prepacked") == served(cluster, "packed")


def make_s2ft(out: Path, seed: int, **bad_index) -> Path:
    """A random S²FT adapter for the tiny model (4 heads of 16, 2 KV heads, 128 channels, 2 layers)."""
    from workers.adapters.s2ft import write_s2ft

    g = torch.Generator().manual_seed(seed)
    updates = {(0, "o_proj"): ([2, 0], torch.randn(64, 32, generator=g) * 0.5),
               (1, "down_proj"): ([5, 77, 31], torch.randn(64, 3, generator=g) * 0.5),
               (1, "v_proj"): ([1], torch.randn(16, 64, generator=g) * 0.5)}
    for module, index in bad_index.items():
        key = next(k for k in updates if k[1] == module)
        updates[key] = (index, updates[key][1])
    return write_s2ft(out, updates)


def s2ft_greedy(model_dir: Path, adapter_dir: Path, lora_dir: Path | None = None) -> list[int]:
    """transformers with the (downloaded, dense) S²FT deltas added to its weights (after merging a LoRA
    into them with peft, if given): the oracle."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    widths = {"o_proj": 16, "v_proj": 16, "down_proj": 1, "up_proj": 1}
    with torch.no_grad():
        for key, delta in tensors.items():
            if not key.endswith(".delta"):
                continue
            path, module = key.removesuffix(".delta"), key.split(".")[-2]
            index = tensors[path + ".index"]
            lines = (index[:, None] * widths[module] + torch.arange(widths[module])).reshape(-1)
            w = model.get_submodule(path).weight  # [out, in]
            if module in ("o_proj", "down_proj"):
                w[:, lines] += delta
            else:
                w[lines, :] += delta
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_s2ft_uploads_serve_what_transformers_with_the_deltas_computes(cluster, tiny_assets, tmp_path):
    model, _ = tiny_assets
    folder = make_s2ft(tmp_path / "s2ft", seed=4)
    with client(cluster) as c:
        v = c.upload_adapter("sparse", folder).versions[0]
        assert v.kind == "s2ft" and v.targets == ["o_proj", "down_proj", "v_proj"]
        plain = unzip(c.download_adapter("sparse"), tmp_path / "plain")
        assert sorted(p.name for p in plain.iterdir()) == ["adapter_model.safetensors", "s2ft_config.json"]
        expected = s2ft_greedy(model, plain)
        assert expected != served(cluster, None)  # the adapter changes the output
        assert served(cluster, "sparse") == expected
        packed = c.upload_adapter("sparse-packed", folder, compression={"method": "compeft", "density": 0.3})
        assert packed.versions[0].kind == "s2ft" and packed.versions[0].compression_ratio > 2
        decoded = unzip(c.download_adapter("sparse-packed"), tmp_path / "decoded")
        assert served(cluster, "sparse-packed") == s2ft_greedy(model, decoded)
        for bad, status in (({"o_proj": [2, 4]}, 422), ({"down_proj": [5, 5, 31]}, 422)):
            before = store_state(cluster)
            bad_folder = make_s2ft(tmp_path / f"bad{len(before)}-{status}-{next(iter(bad))}", seed=4, **bad)
            r = httpx.post(cluster.url + "/v1/adapters", headers={"authorization": f"Bearer {ALICE}"},
                           data={"name": "sparse"}, timeout=60,
                           files=[("files", (p.name, p.read_bytes())) for p in bad_folder.iterdir()])
            assert r.status_code == status, r.text
            assert "out of range" in r.json()["error"]["message"] or "duplicate" in r.json()["error"]["message"]
            assert store_state(cluster) == before


def completion_text(cluster, merged: dict | None, model: str = "tiny", key=ALICE) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    if merged is not None:
        body["merged_adapters"] = merged
    return httpx.post(cluster.url + "/v1/completions", headers={"authorization": f"Bearer {key}"}, json=body,
                      timeout=60)


def test_per_request_merges_equal_the_saved_merge_and_the_oracles(cluster, loras, tiny_assets, tmp_path):
    model, _ = tiny_assets
    other = make_lora(model, tmp_path / "other", r=4, seed=9, targets=("q_proj", "down_proj"))
    with client(cluster) as c:
        c.upload_adapter("ma", loras["v1"])
        c.upload_adapter("mb", other)
        c.upload_adapter("ms", make_s2ft(tmp_path / "s2ft", seed=6))
        base_id = c.models().data[0].id
        for spec in ({"ids": ["ma", "mb"], "weights": [0.7, -0.4]},
                     {"ids": ["ma", "mb"], "weights": [1.0, 1.0], "strategy": "ties", "density": 0.5}):
            per_request = served(cluster, None, merged=spec)
            assert per_request != served(cluster, "ma")
            sdk = c.generate(PROMPT, merged_adapters=spec, max_new_tokens=NEW_TOKENS, details=True, ignore_eos=True)
            assert [t.id for t in sdk.details.tokens] == per_request
            saved = c.save_merge("merged-ab", spec).versions[-1]
            assert saved.kind == "lora"
            assert served(cluster, saved.id) == per_request
            folder = unzip(c.download_adapter(saved.id), tmp_path / saved.id.replace("@", "-"))
            assert peft_greedy(model, folder) == per_request  # the merged LoRA, as peft runs it
            r1, r2 = completion_text(cluster, spec, base_id), completion_text(cluster, None, saved.id)
            assert r1.status_code == 200 and r1.json()["choices"][0]["text"] == r2.json()["choices"][0]["text"]
        # a LoRA and an S²FT adapter: a LoRA part and an S²FT part, served together per request
        mixed = {"ids": ["ma", "ms"], "weights": [1.0, 1.0]}
        lora_dir = unzip(c.download_adapter("ma"), tmp_path / "ma")
        s2ft_dir = unzip(c.download_adapter("ms"), tmp_path / "ms")
        assert served(cluster, None, merged=mixed) == s2ft_greedy(model, s2ft_dir, lora_dir)
        r = httpx.post(cluster.url + "/v1/adapters/merge", headers={"authorization": f"Bearer {ALICE}"},
                       json={"name": "mixed", "merged_adapters": mixed})
        assert r.status_code == 400 and "cannot be saved" in r.json()["error"]["message"]
    bad = {
        "unknown member": ({"ids": ["ma", "nope"]}, base_id, ALICE, 404),
        "another tenant's private adapter": ({"ids": ["ma"]}, base_id, BOB, 404),
        "bad strategy": ({"ids": ["ma", "mb"], "strategy": "slerp"}, base_id, ALICE, 400),
        "weights length": ({"ids": ["ma", "mb"], "weights": [1.0]}, base_id, ALICE, 400),
        "an adapter as the model": ({"ids": ["ma", "mb"]}, "ma", ALICE, 400),
    }
    for what, (spec, model_id, key, status) in bad.items():
        r = completion_text(cluster, spec, model_id, key)
        assert r.status_code == status, (what, r.text)
        assert r.json()["error"]["param"] in ("merged_adapters", "model"), what


def test_medusa_heads_uploaded_for_an_adapter_or_the_base_are_used_and_change_no_token(cluster, loras,
                                                                                       tiny_assets, tmp_path):
    from workers.adapters.medusa import init_medusa, write_medusa
    from workers.model.config import DecoderConfig

    model, _ = tiny_assets
    base = DecoderConfig.from_folder(model)

    def heads_folder(name: str, adapter: str | None) -> Path:
        folder = write_medusa(tmp_path / name, init_medusa(base, 3, generator=torch.Generator().manual_seed(1)))
        if adapter is not None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "adapter": adapter}))
        return folder

    def speculative(model_id: str | None) -> tuple[list[int], dict | None]:
        params = {"adapter_id": model_id, "max_new_tokens": NEW_TOKENS, "details": True, "ignore_eos": True}
        r = httpx.post(cluster.url + "/generate", headers={"authorization": f"Bearer {ALICE}"}, timeout=60,
                       json={"inputs": PROMPT, "parameters": params})
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        return [t["id"] for t in details["tokens"]], details.get("speculative")

    with client(cluster) as c:
        c.upload_adapter("hx", loras["v1"])
        plain_adapter, none = speculative("hx")
        plain_base, _ = speculative(None)
        assert none is None  # no heads yet
        heads = c.upload_adapter("hx-heads", heads_folder("hx-heads", "hx"), kind="medusa")
        assert heads.versions[0].attach_to == "hx@1"
        tokens, spec = speculative("hx")
        assert tokens == plain_adapter and spec is not None and spec["decode_steps"] > 0
        assert sum(spec["tokens_per_step"]) == NEW_TOKENS - 1  # the first token comes from the prompt's pass
        tokens, spec = speculative(None)
        assert tokens == plain_base and spec is None  # the adapter's heads are not the base's
        c.upload_adapter("base-heads", heads_folder("base-heads", None), kind="medusa")
        tokens, spec = speculative(None)
        assert tokens == plain_base and spec is not None and spec["decode_steps"] > 0


def _zip(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _bad_uploads(loras, tiny_assets, tmp_path):
    from tiny_models import make_tiny_model

    folder = loras["v1"]
    cfg = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    other_model, _ = make_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    other = make_lora(other_model, tmp_path / "other-lora", r=4)
    wrong_shape = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
    key = next(k for k in wrong_shape if k.endswith("lora_B.weight"))
    wrong_shape[key]["shape"] = [wrong_shape[key]["shape"][1], wrong_shape[key]["shape"][0]]
    header = json.dumps(wrong_shape).encode()
    reshaped = len(header).to_bytes(8, "little") + header + weights[8 + int.from_bytes(weights[:8], "little"):]
    zeros = b"\0" * (7 * 1024 * 1024)
    return {
        "pickle": ([("adapter_config.json", cfg), ("adapter_model.bin", b"\x80\x04K\x01.")], 400),
        "wrong shapes": ([("adapter_config.json", cfg), ("adapter_model.safetensors", reshaped)], 422),
        "wrong base": ([(p.name, p.read_bytes()) for p in other.iterdir() if p.is_file()], 422),
        "rank over cap": ([(p.name, p.read_bytes()) for p in loras["big_rank"].iterdir() if p.is_file()], 422),
        "oversize": ([("adapter_config.json", cfg), ("adapter_model.safetensors", b"\0" * (9 * 1024 * 1024))], 413),
        "zip bomb": ([("a.zip", _zip({"adapter_config.json": cfg, "adapter_model.safetensors": zeros}))], 413),
        "path traversal": ([("a.zip", _zip({"../adapter_config.json": cfg, "adapter_model.safetensors": weights}))],
                           400),
        "symlink entry": ([("a.zip", _zip({"adapter_config.json": cfg}, symlink="adapter_model.safetensors"))], 400),
        "truncated safetensors": ([("adapter_config.json", cfg), ("adapter_model.safetensors", weights[:-100])], 400),
        "bad JSON config": ([("adapter_config.json", b"{nope"), ("adapter_model.safetensors", weights)], 400),
    }


def test_every_bad_upload_is_refused_and_the_store_is_unchanged(cluster, loras, tiny_assets, tmp_path):
    with client(cluster) as c:
        c.upload_adapter("victim", loras["v1"])
    before, listed = store_state(cluster), httpx.get(cluster.url + "/v1/adapters",
                                                      headers={"authorization": f"Bearer {ALICE}"}).json()
    for what, (files, status) in _bad_uploads(loras, tiny_assets, tmp_path).items():
        for name in ("victim", "fresh"):
            r = httpx.post(cluster.url + "/v1/adapters", headers={"authorization": f"Bearer {ALICE}"},
                           data={"name": name}, files=[("files", f) for f in files], timeout=60)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert r.json()["error"]["message"], what
    assert store_state(cluster) == before
    assert httpx.get(cluster.url + "/v1/adapters", headers={"authorization": f"Bearer {ALICE}"}).json() == listed
    r = httpx.post(cluster.url + "/v1/adapters", headers={"authorization": f"Bearer {ALICE}"},
                   data={"name": "x", "compression": '{"method": "zip"}'},
                   files=[("files", ("adapter_config.json", b"{}"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "compression"


def test_tenants_cannot_see_use_or_delete_each_others_private_adapters(cluster, loras):
    """Names are per tenant (`TENANT/NAME`): another tenant's private adapter is invisible by any name, the
    same bare name in another tenant is another adapter (no 'name taken' oracle), public ones serve by
    their full name."""
    with client(cluster) as alice, client(cluster, BOB) as bob:
        alice.upload_adapter("secret", loras["v1"])
        alice.upload_adapter("shared", loras["v1"], public=True)
        assert not {a.name for a in bob.list_adapters().data} & {"secret", "alice/secret"}
        assert not {m.id for m in bob.models().data} & {"secret", "alice/secret", "alice/secret@1"}
        for name in ("secret", "alice/secret", "alice/never-uploaded"):  # private and missing look the same
            for call in (lambda n=name: bob.get_adapter(n), lambda n=name: bob.download_adapter(n),
                         lambda n=name: bob.delete_adapter(n), lambda n=name: bob.delete_adapter(f"{n}@1"),
                         lambda n=name: bob.completions(n, "hi", max_tokens=1),
                         lambda n=name: bob.generate("hi", adapter_id=f"{n}@1", max_new_tokens=1)):
                with pytest.raises(NotFoundError):
                    call()
        mine = bob.upload_adapter("secret", loras["v2"])  # the same bare name: bob's own, no conflict
        assert mine.name == "secret" and mine.owner == "bob" and mine.latest == 1
        assert served(cluster, "secret", BOB) == served(cluster, "secret@1", BOB) != served(cluster, "secret")
        assert served(cluster, "secret") == served(cluster, "alice/secret")
        with pytest.raises(PermissionDeniedError):  # uploads go into one's own namespace, whatever exists
            bob.upload_adapter("alice/secret", loras["v2"])
        with pytest.raises(PermissionDeniedError):
            bob.upload_adapter("alice/never-uploaded", loras["v2"])
        assert "alice/shared" in {a.name for a in bob.list_adapters().data}
        assert "alice/shared@1" in {m.id for m in bob.models().data}
        assert bob.completions("alice/shared", "hi", max_tokens=1).choices
        assert served(cluster, "alice/shared@1", BOB) == served(cluster, "shared")
        with pytest.raises(NotFoundError):  # a bare name is the caller's own
            bob.completions("shared", "hi", max_tokens=1)
        with pytest.raises(PermissionDeniedError):
            bob.delete_adapter("alice/shared")
        assert alice.get_adapter("secret").latest == 1 and bob.get_adapter("secret").owner == "bob"


def test_delete_versions_and_names(cluster, loras):
    with client(cluster) as c:
        c.upload_adapter("temp", loras["v1"])
        c.upload_adapter("temp", loras["v2"])
        assert c.delete_adapter("temp@2").versions == [2]
        assert c.get_adapter("temp").latest == 1
        with pytest.raises(NotFoundError):
            c.completions("temp@2", "hi", max_tokens=1)
        assert c.upload_adapter("temp", loras["v2"]).latest == 3  # numbers are never reused
        assert sorted(c.delete_adapter("temp").versions) == [1, 3]
        with pytest.raises(NotFoundError):
            c.get_adapter("temp")
        with pytest.raises(NotFoundError):
            c.completions("temp", "hi", max_tokens=1)


def test_cli_adapters_commands(cluster, loras, tmp_path, monkeypatch):
    from adapterd_client.cli import app
    from typer.testing import CliRunner

    monkeypatch.setenv("ADAPTERD_URL", cluster.url)
    monkeypatch.setenv("ADAPTERD_API_KEY", ALICE)
    runner = CliRunner()
    r = runner.invoke(app, ["adapters", "upload", "cli-ada", str(loras["v1"]), "--compeft-density", "0.3"])
    assert r.exit_code == 0, r.output
    assert "cli-ada@1\tcompeft" in r.output
    r = runner.invoke(app, ["adapters", "list"])
    assert r.exit_code == 0 and "cli-ada\t@1" in r.output
    r = runner.invoke(app, ["adapters", "show", "cli-ada"])
    assert r.exit_code == 0 and "r=4" in r.output
    out = tmp_path / "cli.zip"
    r = runner.invoke(app, ["adapters", "download", "cli-ada@1", "-o", str(out)])
    assert r.exit_code == 0 and zipfile.is_zipfile(out)
    r = runner.invoke(app, ["adapters", "merge", "cli-merged", "cli-ada", "cli-ada@1", "--weights", "0.5,0.25",
                            "--strategy", "ties", "--density", "0.5"])
    assert r.exit_code == 0 and "cli-merged@1\tlora\tr=4" in r.output, r.output
    r = runner.invoke(app, ["adapters", "merge", "cli-bad", "cli-ada", "--weights", "x"])
    assert r.exit_code != 0
    r = runner.invoke(app, ["adapters", "delete", "cli-ada"])
    assert r.exit_code == 0 and "deleted cli-ada" in r.output
    r = runner.invoke(app, ["adapters", "show", "cli-ada"])
    assert r.exit_code == 1 and "error" in r.output
