"""How far a reduced-precision base (bf16, int8 weight-only) is from the fp32 oracle, measured two ways:

    .venv/bin/python bench/precision_quality.py      # SmolLM2-135M, 32 prompts x 64 greedy tokens

- free-running: each mode decodes its own greedy continuation; agreement = positions whose token equals
  fp32's at the same index. One early flip changes everything after it, so this understates quality.
- teacher-forced: every mode reads fp32's own prompt + continuation in one prefill; agreement = positions
  where the mode's top-1 equals fp32's (the meaningful per-step figure), with the largest logit error
  (absolute and relative to the largest |logit|) and fp32's top-1/top-2 margin where they disagree
  (a disagreement on a near-tie is rounding, not a defect).
Prompts: 16 English text prompts (through the chat template) and 16 of random tokens (the engine bench's);
random tokens give flat next-token distributions, full of near-ties. Writes bench/results/precision_quality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.config import EngineConfig  # noqa: E402
from workers.engine.core import EngineCore  # noqa: E402
from workers.engine.types import GenerationRequest, SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import prefill_logits  # noqa: E402  (every position's logits [T, vocab] of each row)

MODES = {"bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}, "w8a8": {"quantize": "w8a8"},
         "int4": {"quantize": "int4"}, "fp16": {"quantize": "fp16"}}
TOPICS = ["the history of the bicycle", "how bread rises", "why the sky is blue", "the life of honey bees",
          "how a compiler works", "the rules of chess", "volcanoes", "the water cycle", "how to brew tea",
          "the moon landing", "photosynthesis", "the printing press", "how vaccines work", "ocean tides",
          "the Roman empire", "how batteries store energy"]


def text_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for topic in (TOPICS * ((n + len(TOPICS) - 1) // len(TOPICS)))[:n]:
        msgs = [{"role": "user", "content": f"Write a short paragraph about {topic}."}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def random_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    vocab = min(tokenizer.vocab_size, 49152)
    return [torch.randint(100, vocab - 100, (length,), generator=gen).tolist() for _ in range(n)]


def greedy(core: EngineCore, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outs = core.generate([GenerationRequest(tuple(p), params, None) for p in prompts])
    return [[e.token_id for e in o] for o in outs]


def compare(mode_logits: list[torch.Tensor], ref_logits: list[torch.Tensor], prompt_lens: list[int]) -> dict:
    """Teacher-forced: positions predicting the continuation (the last prompt token's onwards, minus the end)."""
    agree = total = 0
    margins, abs_err, rel_err = [], [], []
    for ours, ref, plen in zip(mode_logits, ref_logits, prompt_lens, strict=True):
        o, r = ours[plen - 1:-1], ref[plen - 1:-1]  # [new_tokens, vocab]
        same = o.argmax(-1) == r.argmax(-1)
        agree += int(same.sum())
        total += same.numel()
        top2 = r.topk(2, dim=-1).values
        margins.extend((top2[:, 0] - top2[:, 1])[~same].tolist())
        err = (o - r).abs().amax(-1)  # [new_tokens]
        abs_err.append(err.max().item())
        rel_err.append((err / r.abs().amax(-1)).max().item())
    return {"teacher_forced_agreement": agree / total, "positions": total,
            "max_abs_logit_error": max(abs_err), "max_rel_logit_error": max(rel_err),
            "disagreements": len(margins),
            "fp32_top1_top2_margin_at_disagreements": {
                "median": statistics.median(margins) if margins else None,
                "max": max(margins) if margins else None}}


def free_running(tokens: list[list[int]], ref: list[list[int]]) -> float:
    pairs = [(a, b) for o, r in zip(tokens, ref, strict=True) for a, b in zip(o, r, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def evaluate(core: EngineCore, sets: dict, ref: dict) -> dict:
    out = {}
    for name, prompts in sets.items():
        tokens = greedy(core, prompts, ref["new_tokens"])
        logits = prefill_logits(core, ref["rows"][name])
        out[name] = {"free_running_agreement": free_running(tokens, ref["tokens"][name]),
                     **compare(logits, ref["logits"][name], [len(p) for p in prompts])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, converted once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32, help="half text, half random tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "precision_quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from workers.model.default_model import ensure_default_model

    model_path = str(Path(args.model) if args.model else ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    half = args.prompts // 2
    sets = {"text": text_prompts(tokenizer, half), "random_tokens": random_prompts(tokenizer, args.prompts - half, 32)}
    longest = max(len(p) for s in sets.values() for p in s) + args.new_tokens + 8

    def engine(**kw) -> EngineCore:
        return EngineCore(EngineConfig(model_path=model_path, max_batch=half, max_seq=longest, max_loras=1, **kw),
                          tokenizer=tokenizer)

    start = time.perf_counter()
    fp32 = engine()
    ref = {"new_tokens": args.new_tokens, "tokens": {}, "rows": {}, "logits": {}}
    for name, prompts in sets.items():
        ref["tokens"][name] = greedy(fp32, prompts, args.new_tokens)
        ref["rows"][name] = [p + t for p, t in zip(prompts, ref["tokens"][name], strict=True)]
        ref["logits"][name] = prefill_logits(fp32, ref["rows"][name])
    del fp32
    report = {"config": {**vars(args), "model": model_path, "torch": torch.__version__}, "modes": {}}
    for mode in [m for m in args.modes.split(",") if m]:
        report["modes"][mode] = evaluate(engine(**MODES[mode]), sets, ref)
        print(mode, json.dumps(report["modes"][mode], indent=1), flush=True)
    report["config"]["total_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
