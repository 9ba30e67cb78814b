"""Engine benchmark (issue 2): own engine vs transformers generate vs peft, one process, same inputs.

    .venv/bin/python bench/engine_bench.py            # SmolLM2-135M, 2 threads, 32-token prompts, 64 new tokens

(a) own engine, base model, batch 1 and batch 16        (c) transformers generate, batch 1 and 16
(b) own engine, 16 requests on 16 distinct LoRAs         (d) peft, the same 16 adapters in one mixed batch
(e) peft, the 16 requests served one adapter at a time (set_adapter + generate)
(f) with --modes: the own engine's base at batch 1 and 16 in other precisions (bf16, int8 weight-only, w8a8, int4,
    fp16 weight-only, auto), transformers in bf16 beside bf16; each mode reports greedy-token agreement with own
    fp32 over the prompts and the largest logit error (relative to the largest |logit|) on their prefill.
Greedy, every request decodes exactly `--new-tokens`. Every engine and peer is built first; then `--runs` rounds
run each workload once in turn (interleaved, so a shared machine's drift loads all alike). Reports medians,
aggregate tokens/s, the ratios the issue tracks, batch-1 decode against this machine's memory-bandwidth limit,
and the framework share of a batch-1 fp32 decode step (its forward against the same forward without GEMMs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_tokens_per_s(workloads: dict[str, tuple]) -> dict[str, float]:
    """name → (call, tokens, rounds): each call once to warm up, then rounds in which every workload (that still
    has rounds left) runs once, in turn; the median tokens/s of each."""
    for call, _, _ in workloads.values():
        call()
    seen: dict[str, list[float]] = {name: [] for name in workloads}
    for round_ in range(max(rounds for _, _, rounds in workloads.values())):
        for name, (call, tokens, rounds) in workloads.items():
            if round_ < rounds:
                t = time.perf_counter()
                call()
                seen[name].append(tokens / (time.perf_counter() - t))
    return {name: statistics.median(v) for name, v in seen.items()}


def memory_bandwidth_gbs() -> float:
    """Streaming read bandwidth: sum over a 512 MiB tensor (far larger than any cache)."""
    x = torch.ones(128 * 1024 * 1024)
    t = median_time(lambda: x.sum(), 5)
    return x.nbytes / t / 1e9


def make_adapters(model_path: Path, out: Path, n: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        base = AutoModelForCausalLM.from_pretrained(model_path)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model.save_pretrained(out / f"lora{i}")
        paths.append(out / f"lora{i}")
    return paths


MODES = {"bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}, "w8a8": {"quantize": "w8a8"},
         "int4": {"quantize": "int4"}, "fp16": {"quantize": "fp16"}, "auto": {"dtype": "auto"}}


def cpu_description() -> dict:
    from workers.model.kernel_choice import machine_description

    flags = ""
    try:
        flags = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma", "f16c")
    return {**machine_description(torch.device("cpu")), "flags_of_note": [f for f in wanted if f in flags.split()]}


def prefill_logits(core, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits [T, vocab] of each prompt through the engine's base model (KV slot 0)."""
    from workers.adapters.residency import BASE_PLACEMENT
    from workers.engine.runner import PromptChunk
    from workers.model.batch import build_step_batch

    runner, out = core.runner, []
    with torch.inference_mode():
        for p in prompts:
            runner.set_adapter_batches([], [PromptChunk(0, 0, p, True, BASE_PLACEMENT)])  # no adapter rows
            batch = build_step_batch([], [(0, 0, p, True)], runner.cos, runner.sin, runner.config.sliding_window,
                                     runner.device)
            batch = dataclasses.replace(batch, logits_rows=torch.arange(len(p)))
            out.append(runner.model(batch, runner.kv).float())
    return out


def step_breakdown(core, position: int, steps: int = 20, rounds: int = 7) -> dict:
    """One batch-1 decode step's forward, and the same forward with every base linear returning a preallocated
    output instead of computing it: what a step costs besides its GEMMs (the framework share the issue asks to cut).
    position: the token's (a request midway through its decode). Interleaved rounds, medians."""
    from workers.adapters.residency import BASE_PLACEMENT
    from workers.engine.runner import DecodeRow
    from workers.model.batch import build_step_batch
    from workers.model.decoder import Linear

    runner, outputs = core.runner, {}
    runner.set_adapter_batches([DecodeRow(0, position, 123, BASE_PLACEMENT)], [])  # base rows: no adapter deltas

    def no_gemm(self, x):  # [N, in] → a [N, out] slice of a buffer made once per shape
        out = outputs.get(self.out_features)
        if out is None:
            out = outputs[self.out_features] = torch.zeros(16, self.out_features, dtype=x.dtype)
        return out[:x.shape[0]]

    def step():
        batch = build_step_batch([(0, position, 123)], [], runner.cos, runner.sin, runner.config.sliding_window,
                                 runner.device)
        runner.model(batch, runner.kv)

    real, times = Linear.forward, {"forward_ms": [], "without_gemms_ms": []}
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for key, forward in (("forward_ms", real), ("without_gemms_ms", no_gemm)):
                    Linear.forward = forward
                    step()
                    t = time.perf_counter()
                    for _ in range(steps):
                        step()
                    times[key].append((time.perf_counter() - t) / steps * 1e3)
    finally:
        Linear.forward = real
    out = {k: statistics.median(v) for k, v in times.items()}
    return {**out, "framework_share": out["without_gemms_ms"] / out["forward_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, converted once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runs-slow", type=int, default=1, help="runs of (e), the slowest peer")
    ap.add_argument("--no-adapters", action="store_true", help="skip (b), (d), (e): base and precision figures only")
    ap.add_argument("--modes", default=",".join(MODES), help="other precisions of the own engine ('' for none)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.model.default_model import ensure_default_model

    model_path = Path(args.model) if args.model else ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    B, T, N = args.batch, args.prompt_tokens, args.new_tokens
    gen = torch.Generator().manual_seed(0)
    vocab = min(tokenizer.vocab_size, 49152)
    prompts = [torch.randint(100, vocab - 100, (T,), generator=gen).tolist() for _ in range(B)]
    tmp = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    adapters = [] if args.no_adapters else make_adapters(model_path, tmp, B, args.rank)

    t0 = time.perf_counter()
    core = EngineCore(EngineConfig(model_path=str(model_path), max_batch=B, max_seq=T + N + 8, max_loras=B,
                                   max_rank=args.rank), tokenizer=tokenizer)
    fp32_load_s = time.perf_counter() - t0
    for i, path in enumerate(adapters):
        core.load_adapter(f"lora{i}", path)
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)

    def own(n: int, with_adapters: bool):
        reqs = [GenerationRequest(tuple(prompts[i]), params, f"lora{i}" if with_adapters else None)
                for i in range(n)]
        outs = core.generate(reqs)
        assert all(len(o) == N for o in outs)

    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None

    def hf_generate(model, rows: list[list[int]], **kw):
        ids = torch.tensor(rows)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                                 pad_token_id=0, **kw)
        assert out.shape[1] == T + N

    # workload name → (one call, tokens it decodes, rounds it runs in); every engine and peer is built first, then
    # the rounds run every workload once each, interleaved, so that a shared machine's drift loads them alike
    workloads: dict[str, tuple] = {
        "a1_own_base_b1": (lambda: own(1, False), N, args.runs),
        "a16_own_base_b16": (lambda: own(B, False), B * N, args.runs),
    }
    if adapters:
        workloads["b_own_16_loras_b16"] = (lambda: own(B, True), B * N, args.runs)
    workloads["c1_hf_b1"] = (lambda: hf_generate(hf, prompts[:1]), N, args.runs)
    workloads["c16_hf_b16"] = (lambda: hf_generate(hf, prompts), B * N, args.runs)
    modes = [m for m in args.modes.split(",") if m]
    precision: dict[str, dict] = {}
    if modes:
        reference_tokens = core.generate([GenerationRequest(tuple(p), params, None) for p in prompts])
        reference_logits = prefill_logits(core, prompts)
    for mode in modes:
        t0 = time.perf_counter()
        other = EngineCore(EngineConfig(model_path=str(model_path), max_batch=B, max_seq=T + N + 8, max_loras=1,
                                        max_rank=args.rank, **MODES[mode]), tokenizer=tokenizer)
        load_s = time.perf_counter() - t0

        def own_mode(n: int, engine=other):
            outs = engine.generate([GenerationRequest(tuple(prompts[i]), params, None) for i in range(n)])
            assert all(len(o) == N for o in outs)

        workloads[f"f1_own_{mode}_b1"] = (lambda own_mode=own_mode: own_mode(1), N, args.runs)
        workloads[f"f16_own_{mode}_b16"] = (lambda own_mode=own_mode: own_mode(B), B * N, args.runs)
        tokens = other.generate([GenerationRequest(tuple(p), params, None) for p in prompts])
        agree = sum(a.token_id == b.token_id for ours, ref in zip(tokens, reference_tokens, strict=True)
                    for a, b in zip(ours, ref, strict=True))
        errors = [((o - r).abs().max() / r.abs().max()).item()
                  for o, r in zip(prefill_logits(other, prompts), reference_logits, strict=True)]
        precision[mode] = {"dtype": str(other.runner.dtype).removeprefix("torch."),
                           "quantize": MODES[mode].get("quantize"),
                           "load_s_with_kernel_measurement": load_s,
                           "greedy_agreement_with_fp32": agree / (B * N), "max_rel_logit_error": max(errors)}
    if "bf16" in modes:
        hf_bf16 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
        hf_bf16.generation_config.eos_token_id = None
        workloads["c1_hf_bf16_b1"] = (lambda: hf_generate(hf_bf16, prompts[:1]), N, args.runs)
        workloads["c16_hf_bf16_b16"] = (lambda: hf_generate(hf_bf16, prompts), B * N, args.runs)

    if adapters:
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), adapters[0],
                                         adapter_name="lora0").eval()
        for i, path in enumerate(adapters[1:], start=1):
            peft.load_adapter(path, adapter_name=f"lora{i}")
        peft.generation_config.eos_token_id = None
        names = [f"lora{i}" for i in range(B)]
        workloads["d_peft_mixed_b16"] = (lambda: hf_generate(peft, prompts, adapter_names=names), B * N, args.runs)

        def one_at_a_time():
            for i in range(B):
                peft.set_adapter(f"lora{i}")
                hf_generate(peft, prompts[i:i + 1])

        workloads["e_peft_sequential"] = (one_at_a_time, B * N, args.runs_slow)

    results = interleaved_tokens_per_s(workloads)
    breakdown = step_breakdown(core, position=T + N // 2)
    bandwidth = memory_bandwidth_gbs()
    weight_bytes = sum(p.nbytes for p in core.runner.model.parameters())  # tied weights count once
    limit = bandwidth * 1e9 / weight_bytes  # tokens/s if each decode step only streamed the weights once
    ratios = {} if not adapters else {
        "b/a16 (target >= 0.85)": results["b_own_16_loras_b16"] / results["a16_own_base_b16"],
        "b/d (target >= 4)": results["b_own_16_loras_b16"] / results["d_peft_mixed_b16"],
        "b/e (target >= 15)": results["b_own_16_loras_b16"] / results["e_peft_sequential"],
    }
    ratios |= {
        "a1/c1 (target >= 1.5)": results["a1_own_base_b1"] / results["c1_hf_b1"],
        "a16/c16": results["a16_own_base_b16"] / results["c16_hf_b16"],
        "a1/bandwidth_limit": results["a1_own_base_b1"] / limit,
    }
    for mode in modes:
        ratios[f"{mode} b1 / hf fp32 b1"] = results[f"f1_own_{mode}_b1"] / results["c1_hf_b1"]
        ratios[f"{mode} b1 / own fp32 b1"] = results[f"f1_own_{mode}_b1"] / results["a1_own_base_b1"]
        ratios[f"{mode} b16 / own fp32 b16"] = results[f"f16_own_{mode}_b16"] / results["a16_own_base_b16"]
    if "bf16" in modes:
        ratios["bf16 b1 / hf bf16 b1"] = results["f1_own_bf16_b1"] / results["c1_hf_bf16_b1"]
        ratios["bf16 b16 / hf bf16 b16"] = results["f16_own_bf16_b16"] / results["c16_hf_bf16_b16"]
    report = {
        "config": {**vars(args), "model": str(model_path), "torch": torch.__version__,
                   "cpu": platform.processor() or platform.machine(), "machine": cpu_description(),
                   "total_s": time.perf_counter() - start},
        "fp32_load_s_with_kernel_measurement": fp32_load_s,
        "precision": precision,
        "tokens_per_s": results,
        "fp32_b1_decode_step": breakdown,
        "memory_bandwidth_GBps": bandwidth,
        "weight_bytes": weight_bytes,
        "bandwidth_limit_tokens_per_s_b1": limit,
        "ratios": ratios,
    }
    for k, v in results.items():
        print(f"{k:24s} {v:9.1f} tok/s")
    print(f"memory bandwidth {bandwidth:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB "
          f"→ batch-1 limit {limit:.1f} tok/s")
    print(f"fp32 batch-1 decode step: forward {breakdown['forward_ms']:.1f} ms, without its GEMMs "
          f"{breakdown['without_gemms_ms']:.1f} ms (framework share {breakdown['framework_share']:.0%})")
    for k, v in ratios.items():
        print(f"{k:28s} {v:6.2f}")
    for mode, p in precision.items():
        print(f"{mode}: dtype {p['dtype']}, greedy agreement with fp32 {p['greedy_agreement_with_fp32']:.3f}, "
              f"largest relative logit error {p['max_rel_logit_error']:.4f}, "
              f"load {p['load_s_with_kernel_measurement']:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
