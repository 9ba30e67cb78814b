"""The worker HTTP service around a fake engine: generate (plain and SSE), adapters, errors."""

import json

import httpx
import pytest
from cluster_signing import ClusterAuth, cluster_secret
from serving_fakes import FakeEngine, make_adapter_dir
from store_sources import store_files, store_folder

from workers.service.app import create_app
from workers.service.config import WorkerServiceConfig


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
async def client(engine, tmp_path):
    config = WorkerServiceConfig(worker_id="w1", max_adapters=2, cluster_secret=cluster_secret(), data_dir=tmp_path)
    app = create_app(engine, config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1", auth=ClusterAuth()) as c:
        yield c


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def test_generate_plain(client):
    r = await client.post("/generate", json={"prompt": "hi", "params": {"max_tokens": 5, "logprobs": True}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "abcde"
    assert body["completion_tokens"] == 5 and body["prompt_tokens"] == 2
    assert body["finish_reason"] == "length" and body["worker_id"] == "w1"
    assert body["logprobs"] == [-0.5] * 5 and body["tokens"] == list("abcde")


async def test_generate_stream(client):
    r = await client.post("/generate", json={"prompt_ids": [1, 2, 3], "params": {"max_tokens": 3}, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [e["text"] for e in events] == ["a", "b", "c"]
    assert events[-1]["finish_reason"] == "length" and events[0]["prompt_tokens"] == 3


async def test_chat_messages_use_the_template(client, engine):
    r = await client.post("/generate", json={"messages": [{"role": "user", "content": "yo"}]})
    assert r.status_code == 200
    assert engine.tokenizer.decode(engine.requests[-1].prompt_ids) == "<user>yo<assistant>"


async def test_prompt_too_long_is_a_400_before_streaming(client):
    r = await client.post("/generate", json={"prompt": "x" * 100, "stream": True})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": "a", "prompt_ids": [1]}, 400),  # two prompts
        ({}, 400),  # no prompt
        ({"prompt_ids": [999]}, 400),  # out of vocabulary
        ({"prompt": "a", "params": {"max_tokens": -1}}, 422),
        ({"prompt": "a", "bogus": 1}, 422),
    ],
)
async def test_bad_requests(client, body, status):
    r = await client.post("/generate", json=body)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"type", "message", "param", "code"}


async def test_worker_and_gateway_name_a_bad_field_alike(client):
    """Both boundaries convert validation errors with `adapters_store.error_shape` (one helper)."""
    from adapters_store.error_shape import validation_error

    r = await client.post("/generate", json={"prompt": "a", "params": {"max_tokens": -1}})
    error = r.json()["error"]
    assert error["param"] == "params.max_tokens" and error["message"].startswith("params.max_tokens: ")
    assert validation_error([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}]) == (
        422, {"error": {"type": "invalid_request_error", "message": "missing required field 'model'",
                        "param": "model", "code": "validation_error"}})


async def test_bad_json(client):
    r = await client.post("/generate", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_adapter_loaded_on_demand_once(client, engine, tmp_path):
    sources = {n: store_folder(tmp_path, n, make_adapter_dir(tmp_path / "src", n)) for n in ("a", "b", "c")}
    for name in ("a", "b", "a", "c"):
        r = await client.post("/generate", json={"prompt": "x", "adapter": name, "adapter_path": sources[name]})
        assert r.status_code == 200, r.text
    assert engine.loads == ["a", "b", "c"]
    stats = (await client.get("/stats")).json()
    assert sorted(stats["resident_adapters"]) == ["a", "b", "c"] and stats["in_flight"] == 0


async def test_unknown_adapter_without_path_is_404(client):
    r = await client.post("/generate", json={"prompt": "x", "adapter": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


async def test_load_and_unload_routes(client, engine, tmp_path):
    z = store_folder(tmp_path, "z", make_adapter_dir(tmp_path / "src", "z"))
    empty = store_files(tmp_path, "empty", {"weights.bin": b"no config"})
    r = await client.post("/adapters/load", json={"name": "z", "path": z})
    assert r.status_code == 200 and r.json()["resident_adapters"] == ["z"]
    r = await client.post("/adapters/load", json={"name": "bad", "path": empty})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    assert str(tmp_path) not in r.text  # names the source, never the worker's folders
    for source in ("store:missing@1", "dropin:z"):  # not in the store; a folder (workers take store versions only)
        r = await client.post("/adapters/load", json={"name": "bad", "path": source})
        assert r.status_code in (400, 404) and str(tmp_path) not in r.text
    r = await client.post("/adapters/unload", json={"name": "z"})
    assert r.status_code == 200 and engine.resident == []
    r = await client.post("/adapters/unload", json={"name": "z"})
    assert r.status_code == 404


async def test_health(client):
    r = await client.get("/health")
    assert r.json() == {"status": "ok", "worker_id": "w1", "model_id": "fake-model"}
