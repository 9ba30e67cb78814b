"""Chaos figures: the longer variants of tests/chaos against one real `adapterd serve` (embedded valkey,
gateway, 2 workers, tiny random model, all on 127.0.0.1). Writes bench/results/chaos.json.

- fuzz: schemathesis over the live gateway's OpenAPI, N cases per operation: cases, 5xx.
- poison: a top_p=1e-300 request beside 8 others, R rounds: how many of the others succeed.
- oversized: a chunked 200 MB body to the gateway and to a worker: status, bytes sent before the refusal,
  RSS growth of the gateway and the worker.
- worker kill: C concurrent clients (half streamed); kill -9 of a worker mid-run: requests, successes,
  failures by kind, hangs, successes between the kill and the restart, seconds until the worker is back.
- valkey kill: kill -9 of valkey with a queued job and the adapters in place: seconds until a completion
  and the job list succeed after the restart, what answered meanwhile, jobs and adapters lost.

    .venv/bin/python bench/chaos_bench.py [--fuzz-per-operation 250] [--clients 50] [--load-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "chaos"))
sys.path.insert(0, str(ROOT / "tests" / "serving"))

from chaos_tools import (  # noqa: E402
    LoadResult,
    PeakGrowth,
    big_training_file,
    chunked_flood,
    fuzz,
    kill9,
    listening_ports,
    member_headers,
    run_load,
    serve,
    upload_adapter,
    upload_peak_growth_mb,
    wait_until,
)
from serving_assets import build_lora, build_tiny_model  # noqa: E402

MB = 1024 * 1024


def poison(served, rounds: int) -> dict:
    model = served.base_model()
    bodies = [{"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-300}]
    bodies += [{"model": model, "prompt": f"other {i}", "max_tokens": 8, "temperature": 0.7, "seed": i}
               for i in range(8)]

    async def run() -> dict:
        ok_others = ok_poison = 0
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            for _ in range(rounds):
                replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
                ok_poison += replies[0].status_code == 200
                ok_others += sum(r.status_code == 200 for r in replies[1:])
        return {"rounds": rounds, "others": 8 * rounds, "others_ok": ok_others, "top_p_request_ok": ok_poison}

    return asyncio.run(run())


def oversized(served) -> dict:
    roles = served.roles()
    gateway, worker = roles["gateway"][0], roles["worker"][0]
    [port] = listening_ports(worker)
    with PeakGrowth([gateway, worker]) as growth:
        g_status, g_sent = chunked_flood(served.url, "/v1/completions", 200 * MB)
        w_status, w_sent = chunked_flood(f"http://127.0.0.1:{port}", "/generate", 200 * MB,
                                         headers=member_headers(served, "POST", "/generate"))
    with tempfile.TemporaryDirectory() as tmp:
        up_status, up_growth = upload_peak_growth_mb(served, big_training_file(Path(tmp) / "big.jsonl", 60))
    return {"body_mb": 200, "gateway_status": g_status, "gateway_sent_mb": round(g_sent / MB, 1),
            "worker_status": w_status, "worker_sent_mb": round(w_sent / MB, 1),
            "gateway_peak_rss_growth_mb": growth.mb[gateway], "worker_peak_rss_growth_mb": growth.mb[worker],
            "training_file_mb": 60, "training_file_status": up_status,
            "training_file_gateway_peak_rss_growth_mb": up_growth}


def worker_kill(served, clients: int, load_s: float) -> dict:
    model = served.base_model()
    victim = served.roles()["worker"][0]
    result, stop = LoadResult(), asyncio.Event()
    loop = asyncio.new_event_loop()
    driver = threading.Thread(target=lambda: loop.run_until_complete(
        run_load(served.url, model, clients, stop, result, timeout=30)))
    started = time.monotonic()
    driver.start()
    try:
        wait_until(lambda: result.ok >= clients, 120, "the load to run")
        time.sleep(max(0.0, load_s / 3 - (time.monotonic() - started)))  # a third of the run before the kill
        result.ok_after["kill"] = 0
        kill9(victim)
        survivors = set(served.roles()["worker"]) - {victim}
        back_s = wait_until(lambda: len(set(served.roles()["worker"]) - survivors) == 1
                            and served.replaced("worker", victim), 180, "the worker to come back")
        ok_while_down = result.ok_after["kill"]
        time.sleep(max(0.0, load_s - (time.monotonic() - started)))  # the rest of the run
    finally:
        loop.call_soon_threadsafe(stop.set)
        driver.join(90)
    return {"clients": clients, "seconds": round(time.monotonic() - started, 1), **result.as_dict(),
            "ok_between_kill_and_restart": ok_while_down, "worker_back_after_s": round(back_s, 1),
            "clients_finished": not driver.is_alive()}


def valkey_kill(served) -> dict:
    http = httpx.Client(base_url=served.url, timeout=30)
    line = b'{"prompt": "a", "completion": "b"}\n'
    file_id = http.post("/v1/files", files={"file": ("t.jsonl", line * 4)}, data={"purpose": "fine-tune"}).json()["id"]
    job = http.post("/v1/fine_tuning/jobs", json={"model": served.base_model(), "training_file": file_id}).json()
    jobs_before = {j["id"] for j in http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]}
    upload_adapter(http, "kept", served.data_dir / "adapters" / "alpha")
    adapters_before = sorted((a["name"], a["latest"]) for a in http.get("/v1/adapters").json()["data"])
    model = served.base_model()
    [valkey] = served.roles()["valkey"]
    kill9(valkey)
    killed = time.monotonic()
    during: dict[str, int] = {}

    def served_again() -> bool:
        jobs = http.get("/v1/fine_tuning/jobs", params={"limit": 100})
        during[str(jobs.status_code)] = during.get(str(jobs.status_code), 0) + 1
        done = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
        return jobs.status_code == 200 and done.status_code == 200

    wait_until(lambda: served.replaced("valkey", valkey), 60, "valkey to be restarted")
    restarted_after = time.monotonic() - killed
    recovered = wait_until(served_again, 60, "requests to succeed again")
    jobs_after = {j["id"] for j in http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]}
    adapters_after = sorted((a["name"], a["latest"]) for a in http.get("/v1/adapters").json()["data"])
    return {"valkey_restarted_after_s": round(restarted_after, 2),
            "requests_succeed_after_restart_s": round(recovered, 2),
            "job_list_statuses_meanwhile": during, "jobs_before": len(jobs_before),
            "jobs_lost": len(jobs_before - jobs_after), "job_kept": job["id"] in jobs_after,
            "adapters_before": len(adapters_before), "adapters_lost": len(set(adapters_before) - set(adapters_after))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fuzz-per-operation", type=int, default=250)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--load-s", type=float, default=60)
    p.add_argument("--poison-rounds", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        build_lora(model, root / "data" / "adapters" / "alpha", seed=1)
        (root / "logs").mkdir()
        t0 = time.monotonic()
        served = serve(model, root / "data", root / "logs", workers=2)
        result = {"machine": platform.processor() or platform.machine(), "startup_s": round(time.monotonic() - t0, 1)}
        try:
            for name, run in (("fuzz", lambda: fuzz(served.url, args.fuzz_per_operation)),
                              ("poison", lambda: poison(served, args.poison_rounds)),
                              ("oversized", lambda: oversized(served)),
                              ("worker_kill", lambda: worker_kill(served, args.clients, args.load_s)),
                              ("valkey_kill", lambda: valkey_kill(served))):
                t = time.monotonic()
                result[name] = run()
                result[name]["bench_s"] = round(time.monotonic() - t, 1)
                if name == "fuzz":
                    result[name]["server_errors"] = result[name]["server_errors"][:20]
                print(name, json.dumps(result[name]), flush=True)
        finally:
            served.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
