"""`adapterd serve` as a user runs it (embedded valkey, gateway, a worker), the CLI client commands
against it, and a clean stop on SIGTERM with no process left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
from serving_cluster import ROOT, _env, free_port

pytestmark = pytest.mark.timeout(150)
ADAPTERD = [sys.executable, "-m", "server.operator_cli"]  # the server distribution's operator commands
CLIENT = [sys.executable, "-m", "adapterd_client.cli"]  # the SDK's client commands


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def served(tiny_assets, tmp_path_factory):
    model, data = tiny_assets
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [
        *ADAPTERD,
        "serve",
        "--port",
        str(port),
        "--workers",
        "1",
        "--model",
        str(model),
        "--data-dir",
        str(data),
        "--heartbeat-ttl",
        "2",
        "--max-model-len",
        "300",
    ]
    env = _env()
    env.pop("ADAPTERD_CLUSTER_SECRET")  # as a user runs it: serve makes the cluster secret itself
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    line = ""
    while time.monotonic() < deadline and "ready at" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            pytest.fail(f"serve exited: {log.read_text()[-3000:]}")
    assert f"ready at {url}" in line
    yield proc, url, data
    if proc.poll() is None:
        proc.kill()


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLIENT, *args, "--url", url], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )


def test_cli_commands(served):
    _, url, _ = served
    models = cli(url, "models")
    assert models.returncode == 0, models.stderr
    assert "alpha\t(adapter of model)" in models.stdout and "beta@v2" in models.stdout
    gen = cli(url, "generate", "hello", "--adapter", "alpha", "--max-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    chat = cli(url, "chat", "hi", "--model", "beta", "--max-tokens", "4", "--no-stream")
    assert chat.returncode == 0, chat.stderr
    missing = cli(url, "generate", "hello", "--adapter", "ghost")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_max_model_len_flag_reaches_the_workers_and_the_model_cards(served):
    _, url, _ = served
    cards = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    assert cards and all(c["max_model_len"] == 300 for c in cards)


def test_upload_through_the_cli_is_servable_at_once(served):
    _, url, data = served
    folder = data / "adapters" / "alpha"
    up = cli(url, "adapters", "upload", "uploaded", *[str(p) for p in sorted(folder.iterdir())])
    assert up.returncode == 0, up.stderr
    gen = cli(url, "generate", "hello", "--adapter", "uploaded@1", "--max-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    assert "uploaded" in cli(url, "adapters", "list").stdout


def test_embedded_valkey_uses_aof(served):
    _, _, data = served
    conf = (data / "redis" / "valkey.conf").read_text()
    assert "appendonly yes" in conf


def test_serve_runs_with_secrets_on(served):
    """A cluster secret and a Redis password are made in the data dir (0600); Redis refuses a client without
    the password; the worker refuses unsigned requests."""
    _, _, data = served
    for name in ("cluster-secret", "redis-password"):
        assert (data / name).stat().st_mode & 0o777 == 0o600
    assert (data / "redis").stat().st_mode & 0o777 == 0o700
    password = (data / "redis-password").read_text().strip()
    conf = (data / "redis" / "valkey.conf").read_text()
    port = int(next(line.split()[1] for line in conf.splitlines() if line.startswith("port ")))
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).keys("*")
    authed = redis.Redis(port=port, password=password)
    (worker_key,) = authed.keys("adapterd:v1:worker:*")
    info = json.loads(authed.get(worker_key))
    assert info["signature"]
    r = httpx.post(info["url"] + "/generate", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "cluster_auth_required"


def test_a_default_serve_has_a_trainer_that_runs_jobs(served, tmp_path):
    _, url, _ = served
    deadline = time.monotonic() + 60  # the trainer announces itself once it has loaded the base
    status = cli(url, "status")
    while "1 trainer(s)" not in status.stdout and time.monotonic() < deadline:
        time.sleep(0.5)
        status = cli(url, "status")
    assert status.returncode == 0 and "1 worker(s), 1 trainer(s)" in status.stdout, (status.stdout, status.stderr)
    records = tmp_path / "train.jsonl"
    records.write_text('{"prompt": "two plus two is", "completion": " four."}\n' * 8)
    job = cli(url, "jobs", "create", str(records), "-p", "epochs=1", "-p", "batch_size=8", "-p", "max_seq_len=32",
              "--follow")
    assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout, job.stderr)
    assert "No trainer is running" not in job.stderr


def test_sigterm_stops_everything(served):
    proc, url, _ = served
    tree = descendants(proc.pid)
    assert len(tree) >= 4  # valkey-server, worker, trainer, gateway
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)]


def test_refuses_public_bind_without_keys(tmp_path):
    env = _env()
    env.pop("ADAPTERD_API_KEYS", None)
    r = subprocess.run(
        [*ADAPTERD, "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "refusing to bind" in r.stderr
