"""Graceful drain of a worker (workers/service/drain.py) on real processes: SIGTERM makes it leave the placement set
at once, its in-flight streams complete, every request sent after the signal is served by the other worker
(none reaches the draining one), and it exits; a stream still running when the grace period ends gets an
error event and the worker exits."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from adapterd_client import Client
from cluster_signing import ClusterAuth  # noqa: E402
from serving_cluster import ready_workers, start_gateway, start_worker, wait_until

from adapters_store.wire import worker_key

pytestmark = pytest.mark.timeout(240)
STREAMS, AFTER, TOKENS = 8, 6, 480  # the tiny model has 512 positions


def served_by(metrics: str, worker: str) -> int:
    return sum(int(float(v)) for v in re.findall(
        rf'adapterd_requests_total{{[^}}]*outcome="ok"[^}}]*worker="{worker}"[^}}]*}} (\S+)', metrics)
        + re.findall(rf'adapterd_requests_total{{[^}}]*worker="{worker}"[^}}]*outcome="ok"[^}}]*}} (\S+)', metrics))


def test_sigterm_drains_a_worker(valkey, tiny_assets, tmp_path):
    model, _ = tiny_assets
    url = f"{valkey.connection_url}/12"
    db = redis.Redis.from_url(url)
    db.flushdb()
    logs = tmp_path / "logs"
    logs.mkdir()
    a = start_worker("drain-a", model, url, logs, 2.0, "--drain-grace", "60", data_dir=tmp_path / "data")
    b = start_worker("drain-b", model, url, logs, 2.0, data_dir=tmp_path / "data")
    gw = start_gateway(url, tmp_path / "data", logs)
    procs = [a, b, gw]
    try:
        wait_until(lambda: ready_workers(gw.url) == 2, 120, "two workers", procs)
        assert httpx.get(a.url + "/ready", timeout=5).status_code == 200
        started, ends, results = threading.Barrier(STREAMS + 1), [], []

        def stream() -> None:
            with Client(gw.url, timeout=120) as c:
                events = c.generate_stream("hello", max_new_tokens=TOKENS, ignore_eos=True)
                first = next(events)
                started.wait(60)
                rest = list(events)
                ends.append(time.monotonic())
                results.append((first, rest))

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for t in threads:
            t.start()
        started.wait(60)  # every stream has its first token
        on_a = httpx.get(a.url + "/stats", timeout=5, auth=ClusterAuth()).json()["in_flight"]
        a.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: not db.exists(worker_key("drain-a")), 10, "worker a deregistered")
        left = time.monotonic()
        with Client(gw.url, timeout=60) as c:  # sent while a drains: all served, by b
            after = [c.generate("hi", max_new_tokens=2, ignore_eos=True) for _ in range(AFTER)]
        for t in threads:
            t.join(120)
        a.popen.wait(60)  # exits once its streams are done, well within the grace period
        exited = time.monotonic()

        assert on_a >= 1  # the drain had streams to finish
        assert len(results) == STREAMS and all(len(rest) == TOKENS - 1 for _, rest in results)
        assert all(rest[-1].details.finish_reason == "length" for _, rest in results)
        assert left < max(ends) and max(ends) > signalled  # deregistered while streams were still running
        assert exited - signalled < 60 and len(after) == AFTER
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert served_by(metrics, "drain-a") == on_a  # only what it held at the signal
        assert served_by(metrics, "drain-b") == STREAMS - on_a + AFTER
        assert db.smembers("adapterd:v1:workers") == {b"drain-b"}
    finally:
        for p in procs:
            p.stop()


def long_context(model: Path, out: Path) -> Path:
    """The tiny model with 8192 positions (RoPE: same weights), so one stream outlasts the grace period."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return out


def test_streams_still_running_after_the_grace_period_end_with_an_error(valkey, tiny_assets, tmp_path):
    model = long_context(tiny_assets[0], tmp_path / "long")
    logs = tmp_path / "logs"
    logs.mkdir()
    w = start_worker("short-grace", model, f"{valkey.connection_url}/13", logs, 2.0, "--drain-grace", "0.5",
                     "--max-seq", "8192", data_dir=tmp_path / "data")
    try:
        wait_until(lambda: httpx.get(w.url + "/ready", timeout=2).status_code == 200, 120, "worker", [w])
        body = {"prompt": "hello", "stream": True, "params": {"max_tokens": 8000, "ignore_eos": True}}
        lines = []
        with httpx.stream("POST", w.url + "/generate", json=body, timeout=60, auth=ClusterAuth()) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
                    if len(lines) == 1:
                        w.popen.send_signal(signal.SIGTERM)
                        signalled = time.monotonic()
        w.popen.wait(30)
        assert time.monotonic() - signalled < 15
        assert '"worker_shutting_down"' in lines[-1] and len(lines) < 8000
    finally:
        w.stop()
