"""Each role installed exactly as its Dockerfile installs it (tests/deploy/role_build.py: the folders its
COPY lines name, its `pip install .[role]` lines, in a fresh venv), started as its ENTRYPOINT starts it,
and smoke-tested together: the gateway (no torch, no model files: uploads are checked against what the
worker publishes) answers /health and /v1/models, takes an adapter upload and routes a generate to the
worker role; the trainer role takes a fine-tune job and trains it. The SDK, installed alone from
clients/, talks to that gateway; its `adapterd` command gains the operator commands only where the server
distribution is installed."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import redis
from cluster_signing import ClusterAuth
from role_build import BuiltRole, build_role, role_env
from serving_assets import build_lora
from serving_cluster import Proc, free_port, wait_until

pytestmark = pytest.mark.timeout(600)
KEY = "sk-deploy"
RECORDS = [{"prompt": "two plus two is", "completion": " four."},
           {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]}] * 4
NOT_IN_GATEWAY = ("torch", "transformers", "safetensors", "workers")
NOT_IN_SDK = ("torch", "transformers", "fastapi", "uvicorn", "server", "workers", "adapters_store")


@pytest.fixture(scope="module")
def roles(tmp_path_factory) -> dict[str, BuiltRole]:
    built = {r: build_role(r, tmp_path_factory.mktemp(f"role-{r}")) for r in ("gateway", "worker", "trainer")}
    print("role builds (s):", {r: round(b.seconds, 1) for r, b in built.items()})
    return built


def start(role: BuiltRole, name: str, args: list[str], logs, **env: str) -> Proc:
    log = logs / f"{name}.log"
    popen = subprocess.Popen([*role.entrypoint, *args], cwd=role.app, env=role_env(env), stdout=log.open("wb"),
                             stderr=subprocess.STDOUT)
    return Proc(name, "", popen, log)


@pytest.fixture(scope="module")
def cluster(roles, valkey, tiny_model, tmp_path_factory):
    url = f"{valkey.connection_url}/11"
    redis.Redis.from_url(url).flushdb()
    root = tmp_path_factory.mktemp("roles")
    logs, data = root / "logs", root / "data"
    logs.mkdir()
    wport, gport = free_port(), free_port()
    worker = start(roles["worker"], "worker", ["--host", "127.0.0.1", "--port", str(wport), "--redis-url", url,
                                                "--model", str(tiny_model), "--worker-id", "role-worker",
                                                "--heartbeat-ttl", "2", "--max-batch", "4", "--data-dir", str(data)],
                   logs)  # the gateway's data dir: the store (a shared volume under compose)
    worker.url = f"http://127.0.0.1:{wport}"
    gateway = start(roles["gateway"], "gateway", ["--host", "127.0.0.1", "--port", str(gport), "--redis-url", url,
                                                  "--data-dir", str(data)], logs,
                    ADAPTERD_API_KEYS=f"{KEY}:ops", ADAPTERD_REGISTRY_REFRESH_S="0.2")
    gateway.url = f"http://127.0.0.1:{gport}"
    trainer = start(roles["trainer"], "trainer", ["--redis-url", url, "--model", str(tiny_model), "--data-dir",
                                                  str(data), "--trainer-id", "role-trainer", "--checkpoint-every",
                                                  "5", "--log-level", "warning"], logs)
    procs = [worker, gateway, trainer]
    try:
        wait_until(lambda: httpx.get(worker.url + "/ready", timeout=2).status_code == 200, 240, "worker ready", procs)
        wait_until(lambda: httpx.get(gateway.url + "/ready", timeout=2).json().get("workers") == 1, 60,
                   "gateway sees the worker", procs)
        yield {"gateway": gateway, "worker": worker, "trainer": trainer, "procs": procs, "root": root}
    finally:
        for p in procs:
            p.stop()


def api(cluster, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, cluster["gateway"].url + path, headers={"authorization": f"Bearer {KEY}"},
                         timeout=60, **kw)


def _widened(path) -> bytes:
    """The LoRA's tensors with one lora_A one column too wide (an adapter for another base model)."""
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    return save(tensors)


def test_gateway_role_has_no_torch(roles):
    probe = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    r = roles["gateway"].run("-c", probe, *NOT_IN_GATEWAY, "server", "adapters_store", "fastapi")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.replace("'", '"')) == ["server", "adapters_store", "fastapi"]
    # and its whole app imports (routes, the launcher, the operator commands) without torch
    r = roles["gateway"].run("-c", "import sys, server.app, server.launcher, server.operator_cli; "
                                   "sys.exit('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr


def test_roles_serve_upload_generate_and_train(cluster, tiny_model, tmp_path):
    assert api(cluster, "GET", "/health").json() == {"status": "ok"}
    models = api(cluster, "GET", "/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["model"]
    # upload: the gateway has no model files; it checks the adapter against the worker's published shapes
    lora = build_lora(tiny_model, tmp_path / "lora", seed=5)
    files = [("files", (p.name, p.read_bytes())) for p in sorted(lora.iterdir())
             if p.suffix in (".json", ".safetensors")]
    up = api(cluster, "POST", "/v1/adapters", data={"name": "ada"}, files=files)
    assert up.status_code == 201, up.text
    config = ("files", ("adapter_config.json", (lora / "adapter_config.json").read_bytes()))
    bad = api(cluster, "POST", "/v1/adapters", data={"name": "bad"}, files=[config, (
        "files", ("adapter_model.safetensors", _widened(lora / "adapter_model.safetensors")))])
    assert bad.status_code == 422 and "incompatible_adapter" in bad.text, bad.text  # published hidden: 64
    gen = api(cluster, "POST", "/generate", json={"inputs": "two plus", "parameters": {
        "adapter_id": "ada", "max_new_tokens": 4, "details": True}})
    assert gen.status_code == 200 and gen.json()["generated_text"], gen.text
    stats = httpx.get(cluster["worker"].url + "/stats", timeout=5, auth=ClusterAuth()).json()
    assert "ops/ada@1" in stats["resident_adapters"]  # the tenant's namespace
    # the trainer role takes a fine-tune job and trains it to an adapter
    data = "\n".join(json.dumps(r) for r in RECORDS).encode()
    file_id = api(cluster, "POST", "/v1/files", files={"file": ("train.jsonl", data)},
                  data={"purpose": "fine-tune"}).json()["id"]
    job = api(cluster, "POST", "/v1/fine_tuning/jobs", json={
        "model": "model", "training_file": file_id, "suffix": "role",
        "method": {"type": "lora", "rank": 2, "epochs": 2, "batch_size": 4, "max_seq_len": 32}}).json()
    done = {}

    def finished() -> bool:
        done.update(api(cluster, "GET", f"/v1/fine_tuning/jobs/{job['id']}").json())
        return done["status"] in ("succeeded", "failed", "cancelled")

    wait_until(finished, 180, "the fine-tune job", cluster["procs"])
    assert done["status"] == "succeeded", done
    events = api(cluster, "GET", f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any("on trainer role-trainer" in e["message"] for e in events), events
    tuned = api(cluster, "POST", "/generate", json={"inputs": "two plus", "parameters": {
        "adapter_id": done["fine_tuned_model"], "max_new_tokens": 2}})
    assert tuned.status_code == 200, tuned.text


@pytest.fixture(scope="module")
def sdk_venv(roles, tmp_path_factory):
    """The SDK installed alone (from a copy of clients/, as a user would `pip install ./clients`)."""
    import shutil

    from role_build import ROOT, _installer

    root = tmp_path_factory.mktemp("sdk")
    shutil.copytree(ROOT / "clients", root / "clients", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = root / "venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    r = subprocess.run([*_installer(venv), "./clients"], cwd=root, env=role_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return root, venv


def test_sdk_stands_alone_and_talks_to_the_gateway(cluster, sdk_venv):
    root, venv = sdk_venv
    probe = "import importlib.util, sys; print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))"
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe, *NOT_IN_SDK], cwd=root, env=role_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr
    env = role_env({"ADAPTERD_URL": cluster["gateway"].url, "ADAPTERD_API_KEY": KEY})
    script = ("from adapterd_client import Client\n"
              "with Client() as c:\n"
              "    print(c.generate('two plus', 'ada', max_new_tokens=3).generated_text != '')\n"
              "    print(sorted(a.name for a in c.list_adapters().data))\n")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", script], cwd=root, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "True" and "ada" in r.stdout.splitlines()[1]
    r = subprocess.run([str(venv / "bin" / "adapterd"), "models"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "ada\t(adapter of model)" in r.stdout, r.stdout + r.stderr
    helped = subprocess.run([str(venv / "bin" / "adapterd"), "--help"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60)
    assert "generate" in helped.stdout and " serve " not in helped.stdout  # no server here: no operator commands


def test_adapterd_offers_operator_commands_where_the_server_is_installed(roles, sdk_venv):
    from role_build import _installer

    root, venv = sdk_venv
    r = subprocess.run([*_installer(venv), ".[gateway]"], cwd=roles["gateway"].app, env=role_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    helped = subprocess.run([str(venv / "bin" / "adapterd"), "--help"], cwd=root, env=role_env(),
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for command in ("serve", "worker", "trainer", "gateway", "generate", "adapters"):
        assert f" {command} " in helped.stdout, (command, helped.stdout)
    server = subprocess.run([str(venv / "bin" / "adapterd-server"), "serve", "--help"], cwd=root, env=role_env(),
                            capture_output=True, text=True, timeout=60)
    assert server.returncode == 0 and "--workers" in server.stdout


