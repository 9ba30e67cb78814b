"""The own engine of two checkouts, interleaved in one run (issue 13: "behaviour unchanged, within 10%").

    .venv/bin/python bench/engine_ab_bench.py --old /tmp/old-aba6bfd      # this checkout against that one

The own-engine workloads of `bench/engine_bench.py` — (a1) base model batch 1, (a16) base batch 16, (b) 16
requests on 16 distinct LoRAs — on SmolLM2-135M, greedy, each request decoding exactly `--new-tokens`. Each
round runs every checkout once, in a fresh process (its own `workers` package first on sys.path), old and
new alternating, so that a machine shared with other work loads both alike. Reports per-checkout medians over
the rounds (each round: the median of `--runs` timings) and new/old ratios, with the load average. The
workloads keep engine_bench's names; their batch is `--batch` (16 there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
WORKLOADS = ("a1_own_base_b1", "a16_own_base_b16", "b_own_16_loras_b16")


def child(args: argparse.Namespace) -> None:
    """One checkout's figures (tokens/s per workload) as JSON on stdout."""
    sys.path.insert(0, args.tree)
    import torch
    from transformers import AutoTokenizer

    from workers.engine.config import EngineConfig
    from workers.engine.core import EngineCore
    from workers.engine.types import GenerationRequest, SamplingParams

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    B, T, N = args.batch, args.prompt_tokens, args.new_tokens
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49052, (T,), generator=gen).tolist() for _ in range(B)]
    core = EngineCore(EngineConfig(model_path=args.model, max_batch=B, max_seq=T + N + 8, max_loras=B,
                                   max_rank=args.rank, lora_kernel=args.lora_kernel), tokenizer=tokenizer)
    adapters = sorted(Path(args.adapters).iterdir())[:B]
    for i, path in enumerate(adapters):
        core.load_adapter(f"lora{i}", path)
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)

    def rate(n: int, with_adapters: bool) -> float:
        reqs = [GenerationRequest(tuple(prompts[i]), params, f"lora{i}" if with_adapters else None) for i in range(n)]
        core.generate(reqs)  # warm-up
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            outs = core.generate(reqs)
            times.append(time.perf_counter() - t)
            assert all(len(o) == N for o in outs)
        return n * N / statistics.median(times)

    print(json.dumps({"a1_own_base_b1": rate(1, False), "a16_own_base_b16": rate(B, False),
                      "b_own_16_loras_b16": rate(B, True)}))


def run_child(tree: str, args: argparse.Namespace, model: Path, adapters: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--tree", tree, "--model", str(model), "--adapters", str(adapters),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--batch", str(args.batch), "--rank", str(args.rank),
           "--runs", str(args.runs), "--lora-kernel", args.lora_kernel]
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="the other checkout (e.g. a git worktree of the commit before a change)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-kernel", default="auto", help="auto (measured per process: noisy on a loaded box) | fast")
    ap.add_argument("--out", default=str(HERE / "bench" / "results" / "engine_ab_bench.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, converted once)")
    ap.add_argument("--adapters", help="a folder of PEFT LoRA folders to reuse (default: made afresh)")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.old:
        ap.error("--old is required")
    sys.path.insert(0, str(HERE))
    from bench.engine_bench import make_adapters
    from workers.model.default_model import ensure_default_model

    model = Path(args.model) if args.model else ensure_default_model()
    if args.adapters:
        adapters = Path(args.adapters)
    else:
        adapters = Path(tempfile.mkdtemp(prefix="engine-ab-"))
        make_adapters(model, adapters, args.batch, args.rank)
    trees = {"old": str(Path(args.old).resolve()), "new": str(HERE)}
    rounds: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    loads = []
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):  # alternate who goes first
            loads.append(os.getloadavg()[0])
            rounds[name].append(run_child(trees[name], args, model, adapters))
            print(name, rounds[name][-1], f"load {loads[-1]:.1f}", flush=True)
    medians = {name: {w: statistics.median(r[w] for r in rs) for w in WORKLOADS} for name, rs in rounds.items()}
    ratios = {f"{w} new/old": medians["new"][w] / medians["old"][w] for w in WORKLOADS}
    result = {"trees": trees, "settings": {k: getattr(args, k) for k in ("rounds", "runs", "threads", "prompt_tokens",
                                                                          "new_tokens", "batch", "rank",
                                                                          "lora_kernel")},
              "tokens_per_s_median": medians, "ratios": ratios, "rounds": rounds,
              "load_average_1min": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
              "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "load": result["load_average_1min"]}, indent=2))


if __name__ == "__main__":
    main()
