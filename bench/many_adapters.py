"""Thousands of adapters, measured the way S-LoRA measures it (issue 14, item 6).

    .venv/bin/python bench/many_adapters.py                     # 5 minutes per phase (3 phases + capacity)
    .venv/bin/python bench/many_adapters.py --duration 60       # shorter

SmolLM2 (workers.model.default_model); 1,000 distinct r=16 LoRAs on q/k/v/o, written with random tensors
straight to disk (each its own seed, so content addressing cannot collapse them) once under
$ADAPTERD_CACHE_DIR/many_adapters (default ~/.cache/adapterd): one set as fp16 safetensors, one set
ComPEFT-compressed (ternary at 10% density, encoded exactly); each set published into its own adapter store
(validated as an upload is) under --work-dir. One worker's engine and adapter fetcher, in process (the
worker's own path: `AdapterFetcher.ensure` from `store:` sources → materialised folder → 1 GiB host cache →
16 device slots), no HTTP in front.

1. Capacity: the base alone, closed loop with 16 requests always in flight, for --capacity-seconds:
   completed requests per second.
2. The same open-loop load three times, --duration each: Poisson arrivals at 70% of that capacity (the same
   arrival times and prompts in every phase), 32-token prompts, 64 new tokens (greedy, ignore_eos); the
   adapter of each request drawn Zipf(1.0) over the 1,000 (phase "base": no adapter; "fp16"; "compeft").
Reports per phase: throughput (tokens/s and requests/s, and against the base phase), TTFT p50/p99 (arrival
to first token, queueing and adapter loading included), host-cache hit rate (adapter already registered when
the request came), device hit rate (the engine's device_hits / (hits + misses)), host and device loads per
second, evictions. JSON in bench/results/many_adapters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import compeft  # noqa: E402
from adapters_store.backends import LocalBackend  # noqa: E402
from adapters_store.base_model import BaseModelSpec  # noqa: E402
from adapters_store.ingest import prepare  # noqa: E402
from adapters_store.validation import UploadedFile, UploadLimits  # noqa: E402
from adapters_store.version_store import VersionStore  # noqa: E402
from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402
from workers.model.config import DecoderConfig  # noqa: E402
from workers.service.adapter_fetcher import AdapterFetcher, AdapterSources  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERD_CACHE_DIR") or Path.home() / ".cache" / "adapterd") / "many_adapters"


def lora_shapes(cfg: DecoderConfig, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    kv = cfg.num_kv_heads * cfg.head_dim
    outs = {"q_proj": cfg.num_heads * cfg.head_dim, "k_proj": kv, "v_proj": kv, "o_proj": cfg.hidden_size}
    ins = {"q_proj": cfg.hidden_size, "k_proj": cfg.hidden_size, "v_proj": cfg.hidden_size,
           "o_proj": cfg.num_heads * cfg.head_dim}
    shapes = {}
    for layer in range(cfg.num_layers):
        for t in TARGETS:
            shapes[f"base_model.model.model.layers.{layer}.self_attn.{t}"] = ((rank, ins[t]), (outs[t], rank))
    return shapes


def write_adapters(model: Path, kind: str, count: int, rank: int) -> Path:
    """`count` adapters of one kind under the cache (kept across runs); returns their drop-in folder."""
    from safetensors.torch import save_file

    cfg = DecoderConfig.from_folder(model)
    root = cache_root() / f"{cfg.num_layers}x{cfg.hidden_size}-r{rank}" / kind
    shapes = lora_shapes(cfg, rank)
    config = json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                         "base_model_name_or_path": str(model), "bias": "none", "task_type": "CAUSAL_LM"})
    for i in range(count):
        folder = root / f"a{i:04d}"
        if (folder / "adapter_config.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for key, (a_shape, b_shape) in shapes.items():
            tensors[f"{key}.lora_A.weight"] = torch.randn(a_shape, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(b_shape, generator=g) * 0.02
        if kind == "fp16":
            save_file({k: v.half() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        else:  # ternary at 10% density: ComPEFT's own encoding of it is exact
            ternary = {k: (np.sign(v.numpy()) * (torch.rand(v.shape, generator=g) < 0.1).numpy() * 0.02)
                       .astype(np.float32) for k, v in tensors.items()}
            (folder / compeft.FILENAME).write_bytes(compeft.from_ternary(ternary).encode())
        (folder / "adapter_config.json").write_text(config)  # last: marks the folder complete
    return root


def zipf_choices(n: int, count: int, rng: np.random.Generator) -> list[int]:
    """`count` draws of adapter ranks 0..n-1 with P(i) ∝ 1 / (i + 1) (Zipf, exponent 1.0)."""
    p = 1.0 / np.arange(1, n + 1)
    return rng.choice(n, size=count, p=p / p.sum()).tolist()


async def one_request(engine: Engine, loader: AdapterFetcher | None, prompt: list[int], adapter: str | None,
                      params: SamplingParams, record: dict) -> None:
    start = time.perf_counter()
    if adapter is not None and loader is not None:
        record["host_hit"] = adapter in engine.resident_adapters()
        await loader.ensure(adapter, f"store:{adapter}@1")
    first, tokens = None, 0
    async for _ in engine.generate(GenerationRequest(tuple(prompt), params, adapter=adapter)):
        first = first if first is not None else time.perf_counter() - start
        tokens += 1
    record.update(ttft=first, tokens=tokens, latency=time.perf_counter() - start)


async def capacity(engine: Engine, prompts: list[list[int]], params: SamplingParams, seconds: float,
                   concurrency: int) -> dict:
    """Closed loop on the base: `concurrency` requests in flight; completed requests per second."""
    done, stop_at = [], time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker(k: int):
        i = k
        while time.perf_counter() < stop_at:
            record: dict = {}
            await one_request(engine, None, prompts[i % len(prompts)], None, params, record)
            done.append(record)
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests_per_second": len(done) / elapsed, "tokens_per_second": sum(r["tokens"] for r in done) / elapsed,
            "seconds": elapsed, "requests": len(done)}


async def open_loop(engine: Engine, loader: AdapterFetcher | None, arrivals: list[float], prompts: list[list[int]],
                    adapters: list[str | None], params: SamplingParams) -> tuple[list[dict], float]:
    """Starts request i at arrivals[i] seconds; returns the records and the elapsed time."""
    records = [{} for _ in arrivals]
    start = time.perf_counter()
    tasks = []
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one_request(engine, loader, prompts[i], adapters[i], params, records[i])))
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - start


def summarise(records: list[dict], elapsed: float, before: dict, after: dict) -> dict:
    ttft = sorted(r["ttft"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    hits = [r["host_hit"] for r in records if "host_hit" in r]
    dev_hits = after.get("device_hits", 0) - before.get("device_hits", 0)
    dev_misses = after.get("device_misses", 0) - before.get("device_misses", 0)
    return {
        "requests": len(records), "seconds": elapsed, "tokens_per_second": tokens / elapsed,
        "requests_per_second": len(records) / elapsed,
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "host_hit_rate": sum(hits) / len(hits) if hits else None,
        "device_hit_rate": dev_hits / (dev_hits + dev_misses) if dev_hits + dev_misses else None,
        "host_loads_per_second": (after.get("host_loads", 0) - before.get("host_loads", 0)) / elapsed,
        "device_loads_per_second": dev_misses / elapsed,
        "host_evictions": after.get("host_evictions", 0) - before.get("host_evictions", 0),
        "device_evictions": after.get("device_evictions", 0) - before.get("device_evictions", 0),
    }


def publish_adapters(model: Path, folders: Path, count: int, store_dir: Path) -> VersionStore:
    """A fresh store holding the first `count` adapter folders under `folders`, each as version 1 of its name."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = VersionStore(LocalBackend(store_dir))
    base = BaseModelSpec.from_folder(model)
    for folder in sorted(p for p in folders.iterdir() if p.is_dir())[:count]:
        uploads = [UploadedFile(f.name, f.read_bytes()) for f in sorted(folder.iterdir()) if f.is_file()]
        draft, files = prepare(uploads, base, UploadLimits(max_rank=16), name=folder.name, owner="bench", public=True)
        store.publish(draft, files)
    return store


async def run_phase(model: Path, args, name: str, store: VersionStore | None, arrivals, prompts, choices,
                    params) -> dict:
    engine = Engine(EngineConfig(model_path=str(model), max_batch=16, max_seq=128, max_loras=16, max_rank=16,
                                 host_cache_bytes=args.host_cache_mib << 20, lora_targets=TARGETS,
                                 num_threads=args.threads))
    engine.start()
    try:
        loader = None
        if store is not None:
            cache = Path(args.work_dir) / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)  # every phase starts cold
            loader = AdapterFetcher(engine, AdapterSources(store=store, cache_dir=cache))
        adapters = [None if store is None else f"a{c:04d}" for c in choices]
        await one_request(engine, None, prompts[0], None, SamplingParams(max_tokens=2, temperature=0), {})  # warm
        before = engine.stats()["adapters"]
        records, elapsed = await open_loop(engine, loader, arrivals, prompts, adapters, params)
        return summarise(records, elapsed, before, engine.stats()["adapters"])
    finally:
        engine.stop()


async def main_async(args) -> dict:
    from workers.model.default_model import ensure_default_model

    model = Path(args.model or ensure_default_model())
    t0 = time.perf_counter()
    dropins = {kind: write_adapters(model, kind, args.adapters, 16) for kind in ("fp16", "compeft")}
    stores = {kind: publish_adapters(model, folder, args.adapters, Path(args.work_dir) / f"store-{kind}")
              for kind, folder in dropins.items()}
    generate_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    vocab = DecoderConfig.from_folder(model).vocab_size
    prompts = rng.integers(300, vocab, size=(4096, args.prompt_tokens)).tolist()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engine = Engine(EngineConfig(model_path=str(model), max_batch=16, max_seq=128, num_threads=args.threads))
    engine.start()
    try:
        await one_request(engine, None, prompts[0], None, SamplingParams(max_tokens=2, temperature=0), {})
        cap = await capacity(engine, prompts, params, args.capacity_seconds, 16)
    finally:
        engine.stop()
    rate = args.load * cap["requests_per_second"]
    gaps = rng.exponential(1.0 / rate, size=int(rate * args.duration * 2) + 10)
    arrivals = [float(t) for t in np.cumsum(gaps) if t < args.duration]
    choices = zipf_choices(args.adapters, len(arrivals), rng)
    phases = {}
    for name, store in (("base", None), ("fp16", stores["fp16"]), ("compeft", stores["compeft"])):
        phases[name] = await run_phase(model, args, name, store, arrivals, prompts, choices, params)
        print(name, json.dumps(phases[name]), flush=True)
    for name in ("fp16", "compeft"):
        phases[name]["throughput_vs_base"] = phases[name]["tokens_per_second"] / phases["base"]["tokens_per_second"]
    return {"model": model.name, "adapters": args.adapters, "rank": 16, "targets": list(TARGETS),
            "host_cache_mib": args.host_cache_mib, "device_slots": 16, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "duration_s": args.duration, "load": args.load, "threads": args.threads,
            "arrival_rate_rps": rate, "arrivals": len(arrivals), "distinct_adapters_drawn": len(set(choices)),
            "capacity_base": cap, "adapter_generation_seconds": generate_s,
            "adapter_bytes": {k: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                              for k, d in dropins.items()},
            "load_average": os.getloadavg(), "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per phase")
    ap.add_argument("--capacity-seconds", type=float, default=60.0)
    ap.add_argument("--load", type=float, default=0.7, help="arrival rate as a share of the base capacity")
    ap.add_argument("--host-cache-mib", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=str(cache_root() / "work"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "many_adapters.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
