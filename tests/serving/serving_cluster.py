"""Real processes for end-to-end tests: workers (`python -m workers.service`) and gateways
(`python -m server`) on free ports, against a real Redis-compatible server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen
    log: Path

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_worker(name: str, model: Path, redis_url: str, logs: Path, ttl: float = 2.0, *extra: str,
                 data_dir: Path, env: dict[str, str] | None = None) -> Proc:
    """A worker process; `data_dir` is the gateway's (the store and the drop-in adapters/ it loads from)."""
    port = free_port()
    log = logs / f"{name}.log"
    args = [
        sys.executable,
        "-m",
        "workers.service",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--model",
        str(model),
        "--data-dir",
        str(data_dir),
        "--worker-id",
        name,
        "--heartbeat-ttl",
        str(ttl),
        "--max-batch",
        "8",
        "--dtype",
        "float32",  # the oracle path: the tests compare against transformers in fp32
        *extra,
    ]
    popen = subprocess.Popen(
        args, cwd=ROOT, env=_env({"OMP_NUM_THREADS": "1", **(env or {})}), stdout=log.open("wb"),
        stderr=subprocess.STDOUT
    )
    return Proc(name, f"http://127.0.0.1:{port}", popen, log)


def start_gateway(redis_url: str, data_dir: Path, logs: Path, name: str = "gateway", **env: str) -> Proc:
    port = free_port()
    log = logs / f"{name}.log"
    args = [sys.executable, "-m", "server", "--port", str(port), "--redis-url", redis_url, "--data-dir", str(data_dir)]
    settings = {
        "ADAPTERD_REGISTRY_REFRESH_S": "0.1",
        "ADAPTERD_WORKER_CONNECT_TIMEOUT_S": "1",
        "ADAPTERD_WORKER_READ_TIMEOUT_S": "30",
        "ADAPTERD_QUEUE_TIMEOUT_S": "10",
        **env,
    }
    popen = subprocess.Popen(args, cwd=ROOT, env=_env(settings), stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Proc(name, f"http://127.0.0.1:{port}", popen, log)


def wait_until(check, timeout: float, what: str, procs: list[Proc] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}:\n" + "\n".join(p.tail() for p in procs))


def ready_workers(url: str) -> int:
    r = httpx.get(url + "/ready", timeout=2)
    return r.json().get("workers", 0) if r.status_code == 200 else 0


@dataclass
class Cluster:
    gateway: Proc
    workers: list[Proc]
    data_dir: Path
    redis_url: str
    logs: Path
    extra: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateway.url

    def stop(self) -> None:
        for p in [self.gateway, *self.extra, *self.workers]:
            p.stop()


def start_trainer(name: str, model: Path, redis_url: str, data_dir: Path, logs: Path, *extra: str) -> Proc:
    """A trainer process (`python -m workers.trainer.worker`) on `model`, storing into `data_dir`."""
    log = logs / f"{name}.log"
    args = [sys.executable, "-m", "workers.trainer.worker", "--redis-url", redis_url, "--model", str(model),
            "--data-dir", str(data_dir), "--trainer-id", name, "--log-level", "warning", *extra]
    popen = subprocess.Popen(args, cwd=ROOT, env=_env({"OMP_NUM_THREADS": "1"}), stdout=log.open("wb"),
                             stderr=subprocess.STDOUT)
    return Proc(name, "", popen, log)


@contextmanager
def one_worker_cluster(redis_url: str, assets: tuple[Path, Path], logs: Path, worker_name: str,
                       env: dict[str, str] | None = None, worker_args: tuple[str, ...] = (),
                       gateway_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A gateway and one worker (`worker_name`, with `worker_args`) on the tiny model `assets` (model
    folder, data dir), on a flushed Redis database; both processes get `env` added to theirs, the gateway
    also `gateway_env`. Stopped on the way out."""
    import redis

    model, data = assets
    redis.Redis.from_url(redis_url).flushdb()
    worker = start_worker(worker_name, model, redis_url, logs, 2.0, *worker_args, data_dir=data, env=env)
    gateway = start_gateway(redis_url, data, logs, **(env or {}), **(gateway_env or {}))
    cluster = Cluster(gateway, [worker], data, redis_url, logs)
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1, 300, "the worker", [gateway, worker])
        yield cluster
    finally:
        cluster.stop()
