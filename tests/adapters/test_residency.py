"""Residency tiers: device rows budgeted by rank, host cache budgeted by bytes, staging off the loop."""

import asyncio

import pytest
import torch
from tiny_models import make_lora, make_tiny_model

from workers.adapters.slots import LoRARowBank
from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.types import GenerationRequest, SamplingParams
from workers.errors import CapacityError
from workers.model.config import DecoderConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("residency")
    folder, _ = make_tiny_model(root / "base", "llama")
    ranks = {"r2": 2, "r4": 4, "r8a": 8, "r8b": 8, "r8c": 8}
    return folder, {n: make_lora(folder, root / n, r=r, seed=i) for i, (n, r) in enumerate(ranks.items())}


def test_row_bank_first_fit_and_coalescing(tiny):
    folder, _ = tiny
    bank = LoRARowBank(DecoderConfig.from_folder(folder), 16, torch.float32, torch.device("cpu"))
    a, b = bank.allocate(8), bank.allocate(4)
    assert (a, b) == ((1, 9), (9, 13)) and bank.allocate(8) is None and bank.free_rows == 4
    bank.release(a)
    assert bank.allocate(12) is None  # 8 + 4 free rows, but not consecutive
    bank.release(b)
    assert bank.free == [(1, 17)] and bank.allocate(16) == (1, 17)


def test_device_rows_are_budgeted_by_rank(tiny, make_core):
    folder, adapters = tiny
    core = make_core(folder, max_loras=2, max_rank=8)  # 16 rows: two rank-8 adapters, or 8+4+2 …
    for name, path in adapters.items():
        core.load_adapter(name, path)
    m = core.adapters
    for name in ("r8a", "r4", "r2"):
        m.pin(name)
        assert m.acquire(name) is not None
    m.pin("r8b")
    assert m.acquire("r8b") is None  # all rows in use: waits
    m.release("r4")
    m.release("r2")
    assert m.acquire("r8b") is not None  # evicts the unused r4 and r2, least recently used first
    assert set(m.device) == {"r8a", "r8b"} and m.counters["device_evictions"] == 2


def test_host_cache_evicts_unpinned_lru_by_bytes(tiny, make_core):
    folder, adapters = tiny
    probe = make_core(folder, max_rank=8)
    size = probe.read_adapter(adapters["r8a"])[0].nbytes
    core = make_core(folder, max_rank=8, host_cache_bytes=int(2.5 * size))
    evicted = []
    core.adapters.on_evict = evicted.append
    core.load_adapter("r8a", adapters["r8a"])
    core.load_adapter("r8b", adapters["r8b"])
    core.adapters.pin("r8a")
    core.load_adapter("r8c", adapters["r8c"])  # r8b is the LRU entry that is not pinned
    assert evicted == ["r8b"] and core.adapters.resident() == ["r8a", "r8c"]
    assert core.adapters.host_bytes <= int(2.5 * size)
    core.adapters.pin("r8c")
    with pytest.raises(CapacityError):
        core.load_adapter("r8b", adapters["r8b"])  # everything left is pinned
    assert core.adapters.resident() == ["r8a", "r8c"]
    tiny_budget = make_core(folder, max_rank=8, host_cache_bytes=size - 1)
    with pytest.raises(CapacityError):
        tiny_budget.load_adapter("r8a", adapters["r8a"])
    assert tiny_budget.adapters.resident() == []


async def test_staged_decode_and_device_hits(tiny, smollm2_tokenizer):
    folder, adapters = tiny
    engine = Engine(EngineConfig(model_path=str(folder), max_batch=4, max_seq=64, max_rank=8),
                    tokenizer=smollm2_tokenizer)
    engine.start()
    try:
        await engine.load_adapter("r4", str(adapters["r4"]))
        request = GenerationRequest((5, 6, 7), SamplingParams(max_tokens=3, temperature=0), adapter="r4")
        runs = [[e async for e in engine.generate(request)] for _ in range(2)]
        assert [e.token_id for e in runs[0]] == [e.token_id for e in runs[1]]
        stats = engine.stats()["adapters"]
        assert stats["device_misses"] == 1 and stats["device_hits"] == 1
        assert engine.core.adapters.staged == {} and not engine.core.adapters.pins
        many = await asyncio.gather(*[_collect(engine, request) for _ in range(6)])
        assert all(len(r) == 3 for r in many) and engine.stats()["adapters"]["device_misses"] == 1
    finally:
        engine.stop()


async def _collect(engine, request):
    return [e async for e in engine.generate(request)]


def test_compeft_adapter_keeps_compressed_bytes_and_serves_its_decoded_lora(tiny, make_core, tmp_path):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from adapters_store import compeft

    folder, adapters = tiny
    source = adapters["r8a"]
    dense = load_file(str(source / "adapter_model.safetensors"))
    packed = compeft.compress(dense, density=0.2, alpha=1.0)
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    shutil.copy(source / "adapter_config.json", compressed)
    (compressed / compeft.FILENAME).write_bytes(packed.encode())
    decoded = tmp_path / "decoded"  # the same update as a plain PEFT LoRA: the oracle
    decoded.mkdir()
    shutil.copy(source / "adapter_config.json", decoded)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in packed.to_dense().items()},
              str(decoded / "adapter_model.safetensors"))
    core = make_core(folder, max_rank=8)
    core.load_adapter("c", compressed)
    core.load_adapter("d", decoded)
    assert core.adapters.host["c"].nbytes * 4 < core.adapters.host["d"].nbytes
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = core.generate([GenerationRequest((5, 6, 7, 8), params, adapter=a) for a in ("c", "d")])
    assert [e.token_id for e in out[0]] == [e.token_id for e in out[1]]


async def test_worker_loader_loads_once_and_reports_evictions(tiny, smollm2_tokenizer, tmp_path):
    from store_sources import store_folder

    from adapters_store.backends import LocalBackend
    from adapters_store.version_store import VersionStore
    from workers.service.adapter_fetcher import AdapterFetcher, AdapterSources

    folder, adapters = tiny
    probe = Engine(EngineConfig(model_path=str(folder), max_rank=8), tokenizer=smollm2_tokenizer)
    size = probe.core.read_adapter(adapters["r8a"])[0].nbytes
    engine = Engine(EngineConfig(model_path=str(folder), max_rank=8, host_cache_bytes=int(1.5 * size)),
                    tokenizer=smollm2_tokenizer)
    changes = []
    r8a, r8b = (store_folder(tmp_path, n, adapters[n]) for n in ("r8a", "r8b"))
    sources = AdapterSources(store=VersionStore(LocalBackend(tmp_path / "store")), cache_dir=tmp_path / "cache")
    loader = AdapterFetcher(engine, sources, on_change=lambda: changes.append(engine.resident_adapters()))
    await asyncio.gather(*[loader.ensure("r8a", r8a) for _ in range(5)])
    assert engine.stats()["adapters"]["host_loads"] == 1 and changes == [["r8a"]]
    await loader.ensure("r8b", r8b)  # over budget: r8a (unused) is evicted
    assert loader.resident() == ["r8b"] and len(changes) == 3  # the eviction, then the load


async def test_worker_metrics_report_residency(tiny, smollm2_tokenizer, tmp_path):
    import httpx
    from cluster_signing import ClusterAuth, cluster_secret
    from store_sources import store_folder

    from workers.service.app import create_app
    from workers.service.config import WorkerServiceConfig

    folder, adapters = tiny
    engine = Engine(EngineConfig(model_path=str(folder), max_rank=8, max_seq=64), tokenizer=smollm2_tokenizer)
    engine.start()
    try:
        r4 = store_folder(tmp_path, "r4", adapters["r4"])
        config = WorkerServiceConfig(worker_id="w1", cluster_secret=cluster_secret(), data_dir=tmp_path)
        app = create_app(engine, config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1",
                                     auth=ClusterAuth()) as client:
            r = await client.post("/generate", json={"prompt_ids": [5], "adapter": "r4", "adapter_path": "store:r4@2"})
            assert r.status_code == 404 and str(tmp_path) not in r.text
            for _ in range(2):
                r = await client.post("/generate", json={"prompt_ids": [5, 6, 7], "adapter": "r4",
                                                         "adapter_path": r4,
                                                         "params": {"max_tokens": 2}})
                assert r.status_code == 200, r.text
            text = (await client.get("/metrics")).text
        assert 'adapterd_worker_adapter_events_total{event="host_loads"} 1.0' in text
        assert 'adapterd_worker_adapter_events_total{event="device_misses"} 1.0' in text
        assert 'adapterd_worker_adapter_events_total{event="device_hits"} 1.0' in text
        assert 'adapterd_worker_adapters{tier="host"} 1.0' in text
        assert "adapterd_worker_adapter_device_load_seconds_total" in text
    finally:
        engine.stop()
