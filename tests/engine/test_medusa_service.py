"""Medusa heads through the worker service on a real engine: loading (base default heads, attached to an
adapter, refused when they do not fit), tokens-per-step details in responses, per-adapter metrics."""

import json

import httpx
import pytest
import torch
from cluster_signing import ClusterAuth, cluster_secret
from store_sources import store_folder
from tiny_models import make_lora, make_tiny_model

from workers.adapters.medusa import init_medusa, write_medusa
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.service.app import create_app
from workers.service.config import WorkerServiceConfig


@pytest.fixture
async def served(tmp_path, smollm2_tokenizer):
    folder, _ = make_tiny_model(tmp_path / "m", "llama")
    engine = Engine(EngineConfig(model_path=str(folder), max_batch=4, max_seq=128), tokenizer=smollm2_tokenizer)
    engine.start()
    app = create_app(engine, WorkerServiceConfig(worker_id="w1", max_adapters=2, cluster_secret=cluster_secret(),
                                                 data_dir=tmp_path))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1",
                                     auth=ClusterAuth()) as client:
            yield client, engine, folder
    finally:
        engine.stop()


def write_heads(engine, data_dir, name, num_heads=3):
    """Heads in the worker's store; returns their source."""
    heads = init_medusa(engine.core.runner.config, num_heads, 1, 2, 0.3, torch.Generator().manual_seed(0))
    write_medusa(data_dir / "src" / name, heads)
    return store_folder(data_dir, name, data_dir / "src" / name)


async def test_heads_load_serve_and_report(served, tmp_path):
    client, engine, model = served
    body = {"prompt_ids": [5, 6, 7], "params": {"max_tokens": 8, "temperature": 0, "ignore_eos": True}}
    plain = (await client.post("/generate", json=body)).json()
    assert plain["speculative"] is None
    r = await client.post("/adapters/load", json={"name": "h", "path": write_heads(engine, tmp_path, "h"),
                                                   "kind": "medusa"})
    assert r.status_code == 200, r.text
    spec = (await client.post("/generate", json=body)).json()
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["speculative"]["decode_steps"] == 7 and len(spec["speculative"]["tokens_per_step"]) == 7
    assert spec["speculative"]["verified_steps"] >= 1  # the first step probes the new heads
    assert spec["speculative"]["reason"] in ("probe", "cost model", "expected gain")
    assert isinstance(spec["speculative"]["used"], bool) and spec["speculative"]["cost_ratio"] >= 1
    r = await client.post("/generate", json={**body, "stream": True})
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert [e["token_id"] for e in events] == plain["token_ids"]
    assert events[-1]["details"]["mean_tokens_per_step"] >= 1 and "details" not in events[0]
    metrics = (await client.get("/metrics")).text
    assert 'adapterd_worker_medusa_steps_total{adapter=""}' in metrics
    assert 'adapterd_worker_medusa_head_acceptance{adapter="",head="2"}' in metrics
    assert (await client.get("/stats")).json()["medusa"][""]["steps"] > 0


async def test_heads_for_an_adapter_and_bad_heads(served, tmp_path):
    client, engine, model = served
    lora = store_folder(tmp_path, "lora", make_lora(model, tmp_path / "src" / "lora"))
    r = await client.post("/adapters/load", json={"name": "h", "path": write_heads(engine, tmp_path, "h"),
                                                   "kind": "medusa", "attach_to": "lora"})
    assert r.status_code == 404  # the adapter must be loaded first
    assert (await client.post("/adapters/load", json={"name": "lora", "path": lora})).status_code == 200
    r = await client.post("/adapters/load", json={"name": "h", "path": write_heads(engine, tmp_path, "h"),
                                                   "kind": "medusa", "attach_to": "lora"})
    assert r.status_code == 200
    assert set(engine.core.speculator.medusa.heads) == {"lora"}
    body = {"prompt_ids": [5, 6, 7], "adapter": "lora",
            "params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    assert (await client.post("/generate", json=body)).json()["speculative"]["decode_steps"] == 5
    r = await client.post("/adapters/load", json={"name": "h2", "path": write_heads(engine, tmp_path, "h2", 2),
                                                   "kind": "medusa"})
    assert r.status_code == 400 and "needs 3 heads" in r.json()["error"]["message"]
    r = await client.post("/adapters/load", json={"name": "x", "path": lora, "attach_to": "lora"})
    assert r.status_code == 400
    assert set(engine.core.speculator.medusa.heads) == {"lora"}


async def test_heads_come_back_with_their_adapter_after_an_unload(served, tmp_path):
    """The gateway names an adapter's heads on every request; once the adapter was unloaded (its heads
    left with it), the next request loads both again, and speculates again."""
    client, engine, model = served
    lora = store_folder(tmp_path, "lora", make_lora(model, tmp_path / "src" / "lora"))
    heads = write_heads(engine, tmp_path, "h")
    body = {"prompt_ids": [5, 6, 7], "adapter": "lora", "adapter_path": lora, "medusa_path": heads,
            "params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    first = (await client.post("/generate", json=body)).json()
    assert first["speculative"]["decode_steps"] == 5 and set(engine.core.speculator.medusa.heads) == {"lora"}
    assert (await client.post("/adapters/unload", json={"name": "lora"})).status_code == 200
    assert engine.core.speculator.medusa.heads == {}
    again = (await client.post("/generate", json=body)).json()
    assert again["token_ids"] == first["token_ids"] and again["speculative"]["decode_steps"] == 5
    assert set(engine.core.speculator.medusa.heads) == {"lora"}
