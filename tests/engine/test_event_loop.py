"""The worker's event loop never waits for the engine's lock nor for a tokenizer: while a thread holds the
lock (as a long step or an adapter load does), /health, /stats, /metrics and the heartbeat answer at once
and a generation waits for the lock in a thread; while a prompt is being encoded, the loop serves others.

A blocked loop shows as a call that takes as long as the holder holds (HOLD_S), far over PROMPT_S."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from cluster_signing import ClusterAuth, cluster_secret
from tiny_models import make_tiny_model

from adapters_store.cluster_auth import ClusterSigner
from workers.engine.engine import Engine, EngineConfig
from workers.service.app import create_app
from workers.service.config import WorkerServiceConfig
from workers.service.heartbeat import Heartbeat

HOLD_S = 15.0  # the holder lets go after this at most (a safety net: the test releases it itself)
PROMPT_S = 5.0  # what "at once" allows, on a loaded machine
SLOW = "a"  # the prompt whose encoding the second test holds up (one token the tiny model knows)


@pytest.fixture
async def worker(tmp_path, smollm2_tokenizer):
    folder, _ = make_tiny_model(tmp_path, "llama")
    engine = Engine(EngineConfig(model_path=str(folder), max_batch=2, max_seq=64), tokenizer=smollm2_tokenizer)
    engine.start()
    app = create_app(engine, WorkerServiceConfig(worker_id="w1", cluster_secret=cluster_secret(), data_dir=tmp_path))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1",
                                     auth=ClusterAuth()) as client:
            yield client, app.state.service, engine
    finally:
        engine.stop()


def _hold(lock_holder, held: threading.Event, release: threading.Event) -> threading.Thread:
    def run():
        with lock_holder():
            held.set()
            release.wait(HOLD_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert held.wait(HOLD_S)
    return thread


async def _promptly(call) -> httpx.Response | None:
    start = time.perf_counter()
    result = await call
    assert time.perf_counter() - start < PROMPT_S, "the event loop waited"
    return result


async def test_the_loop_answers_while_the_engine_holds_its_lock(worker, redis_url):
    client, service, engine = worker
    beat = Heartbeat(redis_url, service.info, ttl_s=30, interval_s=30, signer=ClusterSigner(cluster_secret()))
    held, release = threading.Event(), threading.Event()

    class both:  # what a step (step_lock, then lock) and an adapter load hold
        def __enter__(self):
            engine.core.step_lock.acquire()
            engine.core.lock.acquire()

        def __exit__(self, *exc):
            engine.core.lock.release()
            engine.core.step_lock.release()

    holder = _hold(both, held, release)
    try:
        body = {"prompt_ids": [5, 6], "params": {"max_tokens": 2}}
        generation = asyncio.create_task(client.post("/generate", json=body))
        for path in ("/health", "/stats", "/metrics"):
            r = await _promptly(client.get(path))
            assert r.status_code == 200, (path, r.text)
        assert (await client.get("/stats")).json()["max_batch"] == 2
        await _promptly(beat.beat())
        assert beat.registered and not generation.done()  # the generation waits for the lock, off the loop
    finally:
        release.set()
        holder.join()
        await beat.stop()
    r = await asyncio.wait_for(generation, 60)
    assert r.status_code == 200 and r.json()["completion_tokens"] == 2, r.text


async def test_the_loop_answers_while_a_prompt_is_encoded(worker, monkeypatch):
    client, service, _ = worker
    encoding, release = threading.Event(), threading.Event()
    real = service.prompts._tok.encode

    def slow_encode(text, **kw):
        if text == SLOW:
            encoding.set()
            release.wait(HOLD_S)
        return real(text, **kw)

    monkeypatch.setattr(service.prompts._tok, "encode", slow_encode)
    try:
        for path, body in (("/tokenize", {"prompt": SLOW}), ("/generate", {"prompt": SLOW})):
            encoding.clear()
            call = asyncio.create_task(client.post(path, json=body))
            assert await asyncio.to_thread(encoding.wait, HOLD_S)
            r = await _promptly(client.get("/health"))
            assert r.status_code == 200 and not call.done()
            release.set()
            assert (await asyncio.wait_for(call, 60)).status_code == 200, path
            release.clear()
    finally:
        release.set()
