"""The gateway in-process over a real Redis, with fake-engine workers served in-process on loopback
ports: OpenAI and native shapes, routing, retries, errors, auth, metrics."""

import asyncio
import json
import socket
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from cluster_signing import cluster_secret
from serving_fakes import FakeEngine, make_adapter_dir, make_base_dir

from adapters_store.cluster_auth import ClusterSigner
from server.app import create_app
from server.settings import GatewaySettings
from workers.service.app import create_app as create_worker_app
from workers.service.config import WorkerServiceConfig
from workers.service.heartbeat import Heartbeat


class Workers:
    """Worker apps served by uvicorn on loopback ports in this event loop; `kill` stops one, after which
    its port refuses connections like a dead worker's."""

    def __init__(self):
        self.servers: dict[str, tuple[uvicorn.Server, asyncio.Task]] = {}

    @staticmethod
    def bind() -> socket.socket:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        return sock

    async def serve(self, worker_id: str, app, sock: socket.socket) -> None:
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.005)
        self.servers[worker_id] = (server, task)

    async def kill(self, worker_id: str) -> None:
        server, task = self.servers.pop(worker_id)
        server.should_exit = True
        await task

    async def stop(self) -> None:
        for worker_id in list(self.servers):
            await self.kill(worker_id)


@asynccontextmanager
async def cluster(redis_url, data_dir, n_workers=2, api_keys="", **settings):
    workers = Workers()
    beats, engines = [], []
    for i in range(n_workers):
        engine = FakeEngine(max_batch=2)
        sock = workers.bind()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        cfg = WorkerServiceConfig(worker_id=f"w{i}", advertise_url=url, max_adapters=4, cluster_secret=cluster_secret(),
                                  data_dir=data_dir)
        wapp = create_worker_app(engine, cfg)
        await workers.serve(f"w{i}", wapp, sock)
        beat = Heartbeat(redis_url, wapp.state.service.info, ttl_s=30, interval_s=30,
                         signer=ClusterSigner(cluster_secret()))
        wapp.state.service.heartbeat = beat
        await beat.beat()
        beats.append(beat)
        engines.append(engine)
    settings.setdefault("base_model_path", make_base_dir(data_dir))
    s = GatewaySettings(redis_url=redis_url, data_dir=data_dir, api_keys=api_keys, **settings)
    app = create_app(s)
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
                client.app, client.workers, client.engines = app, workers, engines
                yield client
    finally:
        await workers.stop()
        for beat in beats:
            await beat.stop()


@pytest.fixture
async def gw(redis_url, tmp_path):
    make_adapter_dir(tmp_path, "alpha", seed=1)
    make_adapter_dir(tmp_path, "beta", "v1", seed=2)
    make_adapter_dir(tmp_path, "beta", "v2", seed=3)
    async with cluster(redis_url, tmp_path) as client:
        yield client


def sse(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message", "param", "code"}
    if code:
        assert err["code"] == code


async def test_completion(gw):
    r = await gw.post("/v1/completions", json={"model": "fake-model", "prompt": "hey", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model"
    assert body["choices"][0]["text"] == "abcd" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_completion_many_prompts_and_logprobs(gw):
    r = await gw.post("/v1/completions", json={"model": "alpha", "prompt": ["a", "bb"], "max_tokens": 2, "logprobs": 1})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 1]
    assert body["usage"]["prompt_tokens"] == 3


async def test_completion_stream(gw):
    r = await gw.post(
        "/v1/completions",
        json={
            "model": "alpha",
            "prompt": "hey",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "abc"
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 3


async def test_chat_and_stop(gw):
    r = await gw.post(
        "/v1/chat/completions",
        json={
            "model": "beta@v1",
            "max_tokens": 8,
            "stop": ["d"],
            "messages": [{"role": "user", "content": "hello"}],
        },
    )
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "beta@v1"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream(gw):
    r = await gw.post(
        "/v1/chat/completions",
        json={
            "model": "beta",
            "max_tokens": 3,
            "stream": True,
            "logprobs": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
        },
    )
    events = sse(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in events[1:-1]) == "abc"
    assert events[1]["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


async def test_models(gw):
    body = (await gw.get("/v1/models")).json()
    ids = {m["id"]: m for m in body["data"]}
    assert set(ids) == {"fake-model", "alpha", "beta", "beta@v1", "beta@v2"}
    assert ids["fake-model"]["parent"] is None and ids["beta@v2"]["parent"] == "fake-model"


async def test_bare_name_is_latest_version(gw):
    await gw.post("/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 1})
    loaded = [n for e in gw.engines for n in e.loads]
    assert loaded == ["admin/beta@1"]  # the folder beta/v2, imported into the store as the operator's
    await gw.post("/v1/completions", json={"model": "beta@v1", "prompt": "x", "max_tokens": 1})
    assert sorted(n for e in gw.engines for n in e.loads) == ["admin/beta@1", "admin/beta@2"]


async def test_native_generate(gw):
    r = await gw.post(
        "/generate",
        json={
            "inputs": "hi",
            "parameters": {"adapter_id": "alpha", "max_new_tokens": 3, "details": True, "top_k": None},
        },
    )
    body = r.json()
    assert body["generated_text"] == "abc"
    assert body["details"]["finish_reason"] == "length" and body["details"]["generated_tokens"] == 3
    assert [t["text"] for t in body["details"]["tokens"]] == ["a", "b", "c"]
    req = [q for e in gw.engines for q in e.requests][-1]
    assert req.params.temperature == 0.0 and req.adapter == "admin/alpha@1"  # TGI: greedy unless asked to sample


async def test_drop_ins_stay_inside_the_allow_list(gw, tmp_path):
    """A drop-in symlinked out of DATA_DIR/adapters is not there (404), nor is a `..` name; LoRAX's
    `adapter_source: "local"` serves a folder inside it by its path, and any other path (a symlink or `..` out,
    another folder) is a 403 that says nothing about it; nothing outside is ever loaded."""
    outside = make_adapter_dir(tmp_path / "outside", "evil", seed=4)
    (tmp_path / "adapters" / "linked").symlink_to(outside)
    for model in ("linked", "../outside/adapters/evil"):
        assert_error(await gw.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}), 404)
    params = {"adapter_source": "local", "max_new_tokens": 2}
    inside = str(tmp_path / "adapters" / "beta" / "v1")
    r = await gw.post("/generate", json={"inputs": "hi", "parameters": {**params, "adapter_id": inside}})
    assert r.status_code == 200, r.text
    for path in (str(outside), str(tmp_path / "adapters" / "linked"), f"{tmp_path}/adapters/../outside/adapters/evil",
                 "/etc"):
        r = await gw.post("/generate", json={"inputs": "hi", "parameters": {**params, "adapter_id": path}})
        assert_error(r, 403, "path_not_allowed")
        assert str(tmp_path) not in r.text
    too_long = f"{tmp_path}/adapters/{'x' * 5000}"  # inside, but no folder the system can name: a 400
    r = await gw.post("/generate", json={"inputs": "hi", "parameters": {**params, "adapter_id": too_long}})
    assert_error(r, 400)
    assert [n for e in gw.engines for n in e.loads] == ["admin/beta@1"]


async def test_native_generate_stream(gw):
    r = await gw.post("/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    events = sse(r.text)
    assert [e["token"]["text"] for e in events] == ["a", "b"]
    assert events[-1]["generated_text"] == "ab" and events[0]["generated_text"] is None


async def test_affinity_same_adapter_same_worker(gw):
    for _ in range(6):
        r = await gw.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
    holders = [e for e in gw.engines if "admin/alpha@1" in e.loads]
    assert len(holders) == 1 and len(holders[0].requests) == 6
    metrics = (await gw.get("/metrics")).text
    assert 'adapterd_requests_total{adapter="admin/alpha@1",outcome="ok",worker="' in metrics
    assert "adapterd_workers_alive 2.0" in metrics


async def test_retry_on_dead_worker(gw):
    await gw.workers.kill("w0")
    for _ in range(4):
        r = await gw.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200, r.text
    assert len(gw.engines[0].requests) == 0 and len(gw.engines[1].requests) == 4
    metrics = (await gw.get("/metrics")).text
    assert 'adapterd_worker_retries_total{worker="w1"}' not in metrics
    retried = [line for line in metrics.splitlines() if line.startswith('adapterd_worker_retries_total{worker="w0"}')]
    assert retried in ([], ['adapterd_worker_retries_total{worker="w0"} 1.0'])  # marked down after one failure


async def test_all_workers_dead_is_503(gw):
    await gw.workers.kill("w0")
    await gw.workers.kill("w1")
    r = await gw.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 1})
    assert_error(r, 503, "worker_unreachable")
    assert r.headers["retry-after"] == "1"
    r = await gw.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 1})
    assert_error(r, 503, "no_worker_available")  # both are marked down now
    assert r.headers["retry-after"] == "1"


async def test_no_worker_is_503(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=0) as client:
        r = await client.post("/v1/completions", json={"model": "anything", "prompt": "x"})
        assert_error(r, 503, "no_worker_available")
        assert "retry-after" in r.headers
        assert_error(await client.get("/ready"), 503)


async def test_unknown_model_is_404_never_base(gw):
    for model in ("nope", "alpha@v9", "../etc"):
        r = await gw.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert_error(r, 404, "model_not_found")
    r = await gw.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert_error(r, 404)
    assert all(not e.requests for e in gw.engines)


async def test_store_reads_stay_off_the_gateway_event_loop(gw, monkeypatch):
    """While the store is slow (a bucket far away), resolving a model waits in a thread: /health answers."""
    import threading
    import time

    from adapters_store.backends import LocalBackend

    reading, release = threading.Event(), threading.Event()
    real_list = LocalBackend.list

    def slow_list(self, prefix):
        reading.set()
        release.wait(15)  # a safety net: the test releases it
        return real_list(self, prefix)

    monkeypatch.setattr(LocalBackend, "list", slow_list)
    try:
        call = asyncio.create_task(gw.post("/v1/completions", json={"model": "not-cached-yet", "prompt": "x"}))
        assert await asyncio.to_thread(reading.wait, 15)
        start = time.perf_counter()
        r = await gw.get("/health")
        assert r.status_code == 200 and time.perf_counter() - start < 5 and not call.done()
    finally:
        release.set()
    assert_error(await asyncio.wait_for(call, 30), 404, "model_not_found")


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/completions", {"prompt": "x"}, 422),  # no model
        ("/v1/completions", {"model": "fake-model"}, 422),  # no prompt
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": -5}, 422),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "n": 9}, 400),  # above MAX_N
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "temperature": 3}, 422),
        ("/v1/completions", {"model": "fake-model", "prompt": "x", "whatever": 1}, 422),
        ("/v1/completions", {"model": "fake-model", "prompt": ""}, 400),
        ("/v1/completions", {"model": "fake-model", "prompt": ["a", "b"], "stream": True}, 400),
        ("/v1/completions", {"model": "fake-model", "prompt": "x" * 100}, 400),  # too long for the model
        ("/v1/chat/completions", {"model": "fake-model", "messages": []}, 422),
        (
            "/v1/chat/completions",
            {"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]},
            422,
        ),
        ("/generate", {"parameters": {}}, 422),
        ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422),
    ],
)
async def test_bad_input_is_4xx_with_error_shape(gw, path, body, status):
    r = await gw.post(path, json=body)
    assert_error(r, status)


async def test_bad_json(gw):
    r = await gw.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_error(await gw.get("/v1/nothing"), 404)


async def test_body_too_large(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1, max_request_bytes=1024) as client:
        r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 2000})
        assert_error(r, 413, "payload_too_large")


async def test_auth(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1, api_keys="k1:acme,k2:globex") as client:
        body = {"model": "fake-model", "prompt": "x", "max_tokens": 1}
        assert_error(await client.post("/v1/completions", json=body), 401, "invalid_api_key")
        bad = {"authorization": "Bearer nope"}
        assert_error(await client.post("/v1/completions", json=body, headers=bad), 401)
        assert_error(await client.get("/v1/models", headers={"authorization": "Basic k1"}), 401)
        ok = await client.post("/v1/completions", json=body, headers={"authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_cluster_views_need_the_admin_key(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1, api_keys="k1:acme", admin_keys="root") as client:
        tenant, admin = {"authorization": "Bearer k1"}, {"authorization": "Bearer root"}
        for path in ("/metrics", "/v1/workers"):
            assert_error(await client.get(path), 401)
            assert_error(await client.get(path, headers=tenant), 403, "admin_required")
        assert "adapterd_workers_alive" in (await client.get("/metrics", headers=admin)).text
        workers = (await client.get("/v1/workers", headers=admin)).json()["data"]
        assert [w["worker_id"] for w in workers] == ["w0"] and workers[0]["gateway_in_flight"] == 0
        ok = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 1},
                               headers=admin)
        assert ok.status_code == 200  # an admin key is also a tenant of its own


async def test_ready(gw):
    body = (await gw.get("/ready")).json()
    assert body["status"] == "ready" and body["workers"] == 2


async def test_queue_full_is_503(redis_url, tmp_path):
    async with cluster(redis_url, tmp_path, n_workers=1, queue_max=0) as client:
        router = client.app.state.router
        worker = client.app.state.registry.alive()[0]
        leases = [await router.acquire(None) for _ in range(worker.capacity)]
        r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
        assert_error(r, 503, "overloaded")
        for lease in leases:
            lease.release()
        r = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
        assert r.status_code == 200
