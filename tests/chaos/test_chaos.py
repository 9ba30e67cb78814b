"""The chaos suite: faults against one real `adapterd serve` (embedded valkey, gateway, 2 workers, tiny
model, all on 127.0.0.1), in this order: schema fuzzing, a poisonous sampling request beside 8 others,
oversized chunked bodies, kill -9 of a worker under 50 concurrent clients, kill -9 of valkey.
bench/chaos_bench.py runs the longer variants of the same scripts and writes the figures."""

import asyncio
import threading
import time

import httpx
import pytest
from chaos_tools import (
    LoadResult,
    PeakGrowth,
    big_training_file,
    chunked_flood,
    fuzz,
    kill9,
    listening_ports,
    member_headers,
    run_load,
    upload_adapter,
    upload_peak_growth_mb,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)
MB = 1024 * 1024


def test_schema_fuzzing_finds_no_5xx(served):
    operations = len(httpx.get(served.url + "/openapi.json").json()["paths"])
    out = fuzz(served.url, examples_per_operation=-(-1000 // operations) + 5)
    assert out["cases"] >= 1000
    assert out["server_errors"] == []


async def test_a_top_p_of_1e_300_beside_8_other_requests_fails_none_of_them(served):
    model = served.base_model()
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        bodies = [{"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-300}]
        bodies += [{"model": model, "prompt": f"other {i}", "max_tokens": 8, "temperature": 0.7, "seed": i}
                   for i in range(8)]
        for _ in range(3):  # several rounds, so that the request shares a batch with the others
            replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            assert [r.status_code for r in replies[1:]] == [200] * 8, [r.text for r in replies]
            assert replies[0].status_code == 200, replies[0].text  # handled numerically: the top token


def test_a_chunked_200_mb_body_is_refused_and_costs_under_50_mb(served):
    roles = served.roles()
    gateway, worker = roles["gateway"][0], roles["worker"][0]
    [port] = listening_ports(worker)
    with PeakGrowth([gateway, worker]) as growth:
        status, sent = chunked_flood(served.url, "/v1/completions", 200 * MB)
        assert status == 413 and sent < 50 * MB  # refused while the body was still arriving
        worker_url = f"http://127.0.0.1:{port}"
        status, sent = chunked_flood(worker_url, "/generate", 200 * MB)
        assert status == 401 and sent < 50 * MB  # an outsider: refused on its headers, no body read
        # a cluster member's headers (signed over a body the flood is not): the worker reads the body to check
        # the signature, and its stream limit refuses it first
        status, sent = chunked_flood(worker_url, "/generate", 200 * MB,
                                     headers=member_headers(served, "POST", "/generate"))
        assert status == 413 and sent < 50 * MB
    assert growth.mb[gateway] < 50 and growth.mb[worker] < 50, growth.mb


def test_a_60_mb_training_file_is_validated_and_stored_without_being_held_in_memory(served, tmp_path):
    status, growth = upload_peak_growth_mb(served, big_training_file(tmp_path / "big.jsonl", 60))
    assert status == 200 and growth < 50, (status, growth)


def test_kill_9_of_a_worker_under_50_clients_fails_cleanly_and_the_worker_comes_back(served):
    model = served.base_model()
    victim = served.roles()["worker"][0]
    result, stop = LoadResult(), asyncio.Event()
    loop = asyncio.new_event_loop()
    driver = threading.Thread(target=lambda: loop.run_until_complete(
        run_load(served.url, model, 50, stop, result, timeout=30)))
    driver.start()
    try:
        wait_until(lambda: result.ok >= 50, 120, "50 requests to succeed under load")
        result.ok_after["kill"] = 0
        killed_at = time.monotonic()
        kill9(victim)
        survivors = set(served.roles()["worker"]) - {victim}
        back = wait_until(lambda: len(set(served.roles()["worker"]) - survivors) == 1
                          and served.replaced("worker", victim), 120, "the worker to be restarted and answering")
        result.ok_after["restart"] = 0
        wait_until(lambda: result.ok_after["restart"] >= 50, 60, "50 requests to succeed after the restart")
    finally:
        loop.call_soon_threadsafe(stop.set)
        driver.join(90)
    assert not driver.is_alive(), "clients still running: a request hangs"
    assert result.hangs == 0, result.as_dict()
    assert result.unclean == [], result.as_dict()
    assert result.ok_after["kill"] > 0  # it kept serving
    assert served.proc.poll() is None
    print("worker kill:", result.as_dict(), f"back after {back:.1f} s", f"(killed at {killed_at:.0f})")


def test_kill_9_of_valkey_loses_nothing_and_requests_succeed_within_10_s_of_the_restart(served):
    http = httpx.Client(base_url=served.url, timeout=30)
    line = b'{"prompt": "a", "completion": "b"}\n'
    up = http.post("/v1/files", files={"file": ("t.jsonl", line * 4)}, data={"purpose": "fine-tune"})
    assert up.status_code == 200, up.text
    job = http.post("/v1/fine_tuning/jobs", json={"model": served.base_model(), "training_file": up.json()["id"],
                                                  "suffix": "chaos"})
    assert job.status_code == 200, job.text
    upload_adapter(http, "kept", served.data_dir / "adapters" / "alpha")
    adapters_before = sorted((a["name"], a["latest"]) for a in http.get("/v1/adapters").json()["data"])
    assert adapters_before
    model = served.base_model()
    [valkey] = served.roles()["valkey"]
    kill9(valkey)
    during = []

    def jobs_answer() -> bool:
        r = http.get("/v1/fine_tuning/jobs")
        during.append(r.status_code)
        assert r.status_code in (200, 503), r.text  # never a 500
        if r.status_code == 503:
            assert r.headers["retry-after"]
        return r.status_code == 200 and any(j["id"] == job.json()["id"] for j in r.json()["data"])

    wait_until(lambda: served.replaced("valkey", valkey), 30, "valkey to be restarted")
    restarted = time.monotonic()
    wait_until(jobs_answer, 10, "the job list to answer with the job after the restart")
    wait_until(lambda: http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4}
                                 ).status_code == 200, 10 - (time.monotonic() - restarted), "a completion")
    recovered = time.monotonic() - restarted
    assert sorted((a["name"], a["latest"]) for a in http.get("/v1/adapters").json()["data"]) == adapters_before
    assert http.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").status_code == 200
    r = http.post("/v1/completions", json={"model": "kept", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    print(f"valkey kill: requests succeed {recovered:.1f} s after the restart; statuses during: {during}")
