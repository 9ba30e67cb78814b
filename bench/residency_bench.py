"""Residency benchmark (issue 4): cold loads, cold vs warm TTFT, adapters per GiB of host cache.

    .venv/bin/python bench/residency_bench.py        # SmolLM2-135M, r=16 LoRA on all 7 targets, ComPEFT 10%

- cold load (store → servable): fetch from the store + validate + host-cache register + decode into device
  rows, for the adapter as peft saves it (fp32 safetensors), as fp16 safetensors, and ComPEFT-compressed;
  from an S3-compatible store (moto's server on loopback: bytes cross a socket, as from a remote store)
  and from a local folder (bytes already in the page cache: the lower bound, no transfer at all);
- TTFT (32-token prompt, first token) with the adapter warm (on device), host-cold (in the host cache,
  not on device) and store-cold (not on the worker at all), each against warm;
- how many compressed adapters fit in a 1 GiB host cache (registered for real, counting evictions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import compeft  # noqa: E402
from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_variants(model_path: Path, out: Path, rank: int, density: float, alpha: float) -> dict[str, Path]:
    """The same LoRA three ways: peft's fp32 file, an fp16 file, and ComPEFT at `density`."""
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    fp32 = out / "fp32"
    model.save_pretrained(fp32)
    fp16 = out / "fp16"
    fp16.mkdir()
    shutil.copy(fp32 / "adapter_config.json", fp16)
    save_file({k: v.half() for k, v in load_torch(str(fp32 / "adapter_model.safetensors")).items()},
              str(fp16 / "adapter_model.safetensors"))
    packed = out / "compeft"
    packed.mkdir()
    shutil.copy(fp32 / "adapter_config.json", packed)
    dense = load_file(str(fp32 / "adapter_model.safetensors"))
    (packed / compeft.FILENAME).write_bytes(compeft.compress(dense, density, alpha).encode())
    return {"fp32": fp32, "fp16": fp16, "compeft": packed}


def s3_store(model_path: Path, variants: dict[str, Path], density: float, alpha: float):
    """Publishes the fp32 and fp16 files, and the fp32 files ComPEFT-compressed on upload, to a store on
    moto's S3 server; returns (the server, the store, {kind: version ref})."""
    import logging
    import os
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    from adapters_store.backends import S3Backend
    from adapters_store.base_model import BaseModelSpec
    from adapters_store.ingest import CompressionRequest, prepare
    from adapters_store.validation import UploadedFile, UploadLimits
    from adapters_store.version_store import VersionStore

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    backend = S3Backend("bench", "store", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    backend._s3.create_bucket(Bucket="bench")
    store, base = VersionStore(backend), BaseModelSpec.from_folder(model_path)
    refs = {}
    for kind, folder, compression in (("fp32", variants["fp32"], None), ("fp16", variants["fp16"], None),
                                      ("compeft", variants["fp32"], CompressionRequest(density=density, alpha=alpha))):
        uploads = [UploadedFile(p.name, p.read_bytes()) for p in folder.iterdir() if p.is_file()]
        draft, files = prepare(uploads, base, UploadLimits(max_rank=64), name=kind, owner="bench",
                               compression=compression)
        refs[kind] = store.publish(draft, files).ref
    return server, store, refs


def weights_file(folder: Path) -> Path:
    return next(p for p in folder.iterdir() if p.name.startswith("adapter_model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--host-cache-gib", type=float, default=1.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "residency_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from workers.model.default_model import ensure_default_model

    model_path = Path(args.model) if args.model else ensure_default_model()
    tmp = Path(tempfile.mkdtemp(prefix="residency-bench-"))
    variants = make_variants(model_path, tmp, args.rank, args.density, args.alpha)
    budget = int(args.host_cache_gib * (1 << 30))
    core = EngineCore(EngineConfig(model_path=str(model_path), max_batch=4, max_seq=args.prompt_tokens + 8,
                                   max_loras=4, max_rank=args.rank, host_cache_bytes=budget),
                      tokenizer=AutoTokenizer.from_pretrained(model_path))
    prompt = tuple(range(1000, 1000 + args.prompt_tokens))
    first_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def ttft(adapter: str | None) -> float:
        t = time.perf_counter()
        core.generate([GenerationRequest(prompt, first_token, adapter)])
        return time.perf_counter() - t

    server, store, refs = s3_store(model_path, variants, args.density, args.alpha)

    def cold_load(kind: str, i: int, from_s3: bool) -> float:
        """Store → servable: fetch, validate, register, decode into device rows."""
        from adapters_store.materialise import materialise

        name = f"{kind}-{i}"
        t = time.perf_counter()
        folder = materialise(store, refs[kind], tmp / f"cache-{name}") if from_s3 else variants[kind]
        core.load_adapter(name, folder)
        with core.lock:
            core.adapters.pin(name)
            core.adapters.acquire(name)
            core.adapters.release(name)
            core.adapters.unpin(name)
        elapsed = time.perf_counter() - t
        core.adapters.unload(name)
        return elapsed

    def host_cold_ttft(kind: str, i: int) -> float:
        name = f"host-{kind}-{i}"
        core.load_adapter(name, variants[kind])
        core.adapters.staged.pop(name, None)  # in the host cache only: decoded at admission
        elapsed = ttft(name)
        core.adapters.unload(name)
        return elapsed

    def store_cold_ttft(kind: str, i: int) -> float:
        name = f"store-{kind}-{i}"
        t = time.perf_counter()
        core.load_adapter(name, variants[kind])
        ttft(name)
        elapsed = time.perf_counter() - t
        core.adapters.unload(name)
        return elapsed

    ttft(None)  # warm-up
    core.load_adapter("warm", variants["fp32"])
    ttft("warm")
    results: dict[str, dict[str, float]] = {"cold_load_s": {}, "ttft_s": {}}
    warm, base = [], []
    samples: dict[str, list[float]] = {}
    for i in range(args.runs):  # interleaved, so machine noise hits every variant alike
        warm.append(ttft("warm"))
        base.append(ttft(None))
        for kind in variants:
            samples.setdefault(f"cold_load/{kind}", []).append(cold_load(kind, i, from_s3=True))
            samples.setdefault(f"cold_load_local/{kind}", []).append(cold_load(kind, i, from_s3=False))
            samples.setdefault(f"host_cold_ttft/{kind}", []).append(host_cold_ttft(kind, i))
            samples.setdefault(f"store_cold_ttft/{kind}", []).append(store_cold_ttft(kind, i))
    med = {k: statistics.median(v) for k, v in samples.items()}
    results["ttft_s"] = {"base": statistics.median(base), "warm": statistics.median(warm),
                         **{k: v for k, v in med.items() if "ttft" in k}}
    results["cold_load_s"] = {k.split("/")[1]: v for k, v in med.items() if k.startswith("cold_load/")}
    results["cold_load_local_s"] = {k.split("/")[1]: v for k, v in med.items() if k.startswith("cold_load_local/")}
    server.stop()
    sizes = {kind: weights_file(path).stat().st_size for kind, path in variants.items()}

    fits_core = EngineCore(EngineConfig(model_path=str(model_path), max_batch=1, max_seq=8, max_loras=1,
                                        max_rank=args.rank, host_cache_bytes=budget), tokenizer=core.tokenizer)
    source, _ = fits_core.read_adapter(variants["compeft"])
    fitted = 0
    while fits_core.adapters.counters["host_evictions"] == 0 and fitted < 100_000:
        fits_core.adapters.register(f"a{fitted}", source)  # same bytes object: RAM stays small
        fitted += 1
    per_gib = fitted - 1 if fits_core.adapters.counters["host_evictions"] else fitted

    warm_ttft = results["ttft_s"]["warm"]
    ratios = {
        "cold_load S3 compeft/fp32 (target <= 0.5)": results["cold_load_s"]["compeft"] / results["cold_load_s"]["fp32"],
        "cold_load S3 compeft/fp16": results["cold_load_s"]["compeft"] / results["cold_load_s"]["fp16"],
        "cold_load local compeft/fp32": results["cold_load_local_s"]["compeft"] / results["cold_load_local_s"]["fp32"],
        "host_cold_ttft compeft/warm (target <= 1.5)": med["host_cold_ttft/compeft"] / warm_ttft,
        "host_cold_ttft fp32/warm": med["host_cold_ttft/fp32"] / warm_ttft,
        "store_cold_ttft compeft/warm": med["store_cold_ttft/compeft"] / warm_ttft,
        "store_cold_ttft fp32/warm": med["store_cold_ttft/fp32"] / warm_ttft,
        "size fp32/compeft": sizes["fp32"] / sizes["compeft"],
        "size fp16/compeft": sizes["fp16"] / sizes["compeft"],
    }
    report = {"config": {**vars(args), "model": str(model_path)}, "file_bytes": sizes, **results,
              "compressed_adapters_per_host_cache": per_gib, "ratios": ratios}
    for kind in variants:
        print(f"{kind:8s} file {sizes[kind] / 1e6:7.2f} MB  cold load S3 {results['cold_load_s'][kind] * 1e3:7.1f} ms "
              f"local {results['cold_load_local_s'][kind] * 1e3:7.1f} ms  "
              f"TTFT host-cold {med[f'host_cold_ttft/{kind}'] * 1e3:7.1f} ms  "
              f"store-cold {med[f'store_cold_ttft/{kind}'] * 1e3:7.1f} ms")
    print(f"TTFT warm adapter {warm_ttft * 1e3:.1f} ms, base {results['ttft_s']['base'] * 1e3:.1f} ms")
    print(f"compressed r={args.rank} adapters in a {args.host_cache_gib:g} GiB host cache: {per_gib}")
    for k, v in ratios.items():
        print(f"{k:46s} {v:7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
