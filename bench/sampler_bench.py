"""Sampler cost against a decode step (issue 17): with no logits processor, warper or logprobs in use, what
the sampler and the code issue 17 added to it (processors pass, logprobs pass) cost at batch 16.

    .venv/bin/python bench/sampler_bench.py          # SmolLM2-135M, 16 decoding rows, 2 threads

Reports medians: one decode step of the engine, the whole sampler on that step's logits ([16, vocab]) for
greedy rows and for sampled rows (temperature 0.8, top-p 0.95), the added passes alone, and their ratios
to the step (the target: added cost ≤ 5% of a step). Also the sampler with every row using penalties +
top-20 logprobs, for scale. Beside the sampler (its fast path: a bounded top-k of candidates, one
inverse-CDF draw), the plain reference's per-row sampling (full sort, multinomial over the vocabulary) on
the same logits, in the same run, and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.logits_processors import process  # noqa: E402
from workers.engine.sampler import _sample_row_reference, raw_logprobs, sample  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decoding_core(model: str, batch: int, params: SamplingParams) -> EngineCore:
    core = EngineCore(EngineConfig(model_path=model, max_batch=batch, max_seq=512))
    for i in range(batch):
        core.add_request(GenerationRequest(tuple(range(100 + i, 132 + i)), params))
    while any(s.in_prefill or not s.output for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    return core


def measure(core: EngineCore, runs: int) -> dict:
    seqs = list(core.scheduler.running)
    logits = step_logits(core)  # [B, vocab]: the model's own, as the sampler meets them
    tokens = logits.argmax(-1).tolist()
    params = [s.request.params for s in seqs]
    rows = [(s.request.params, s.prompt, s.output) for s in seqs]
    step = median_time(core.step, runs)
    sampler = median_time(lambda: sample(logits, seqs), runs)
    added = median_time(lambda: (process(logits, rows), raw_logprobs(logits, tokens, params)), runs)
    reference = median_time(lambda: reference_sampler(logits, seqs), runs)
    return {"step_ms": step * 1e3, "sampler_ms": sampler * 1e3, "added_ms": added * 1e3,
            "reference_sampler_ms": reference * 1e3, "sampler_over_step": sampler / step,
            "added_over_step": added / step, "reference_over_step": reference / step,
            "load_average_1m": os.getloadavg()[0]}


def step_logits(core: EngineCore) -> torch.Tensor:
    """The logits one decode step hands the sampler (read by wrapping `_sample` for that step)."""
    captured, real = [], core._sample

    def spy(seqs, logits, hidden):
        captured.append(logits.clone())
        return real(seqs, logits, hidden)

    core._sample = spy
    try:
        core.step()
    finally:
        core._sample = real
    return captured[0]


def reference_sampler(logits: torch.Tensor, seqs: list) -> None:
    """The plain reference's sampling of every sampled row (greedy rows take the argmax in both)."""
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if p.temperature > 0:
            _sample_row_reference(logits[row], p.temperature, p.top_k, p.top_p, seq.generator, p.min_p, p.typical_p)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder (default: the packaged SmolLM2-135M)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler_bench.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from workers.model.default_model import ensure_default_model

        model = str(ensure_default_model())
    settings = {
        "greedy": SamplingParams(max_tokens=400, temperature=0, ignore_eos=True),
        "sampled": SamplingParams(max_tokens=400, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True),
        "all_in_use": SamplingParams(max_tokens=400, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True,
                                     repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
                                     logit_bias=((5, 2.0),), min_p=0.05, typical_p=0.9, logprobs=True,
                                     top_logprobs=20),
    }
    report = {"model": Path(model).name, "batch": args.batch, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "results": {}}
    for name, params in settings.items():
        report["results"][name] = r = measure(decoding_core(model, args.batch, params), args.runs)
        print(f"{name:>10}: step {r['step_ms']:.2f} ms, sampler {r['sampler_ms']:.3f} ms "
              f"({100 * r['sampler_over_step']:.2f}% of a step; the plain reference "
              f"{100 * r['reference_over_step']:.2f}%), issue-17 passes {r['added_ms']:.3f} ms "
              f"({100 * r['added_over_step']:.2f}%), load {r['load_average_1m']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
