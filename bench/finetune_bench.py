"""Fine-tuning cost and quality: LoRA vs S²FT vs full fine-tuning on the same data (issue 7).

    .venv/bin/python bench/finetune_bench.py      # SmolLM2-135M-Instruct, 2 threads, ~5-8 minutes
    .venv/bin/python bench/finetune_bench.py --threads 1   # on a CPU shared with other jobs (no spinning)

All three run through the trainer's own loop (workers/trainer/training.py: AdamW, warmup + linear decay,
clipping) on the HF model in fp32, one fresh process each (so peak memory is per method):
(full) every weight trained — the reference peer; (lora) r=16 on all seven linears; (s2ft) heads of `o_proj` +
FFN channels of `down_proj`, sized to the LoRA's trainable parameter count. The data is a deterministic
synthetic instruction set (sorting, reversing, adding, spelling backwards, counting vowels; chat format, loss
on the answers) with a disjoint held-out split. Reported: median step time, peak RSS while training (sampled
every 5 ms) and its increase over the loaded model, held-out loss after the same number of steps (each
method with its usual learning rate), and ratios vs full fine-tuning measured in the same run.

    .venv/bin/python bench/finetune_bench.py --previous 7cc4f58   # LoRA on peft vs the hand-written LoRA (issue 16)

`--previous REV` instead runs only the LoRA child, alternately from this tree and from REV (checked out once
with `git worktree add --detach` under /tmp), `--rounds` times each, same data, seed and hyperparameters, and
reports this tree's step time and peak / training memory over REV's (medians of same-round ratios) in
bench/results/finetune_peft_vs_previous.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("lora", "s2ft", "full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass", "orbit", "maple", "candle",
         "forest", "silver", "rocket", "window", "garden", "planet", "bridge", "summer", "castle"]


# data ----------------------------------------------------------------------------------------------
def make_task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    if kind == 0:
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        return f"Sort these numbers in ascending order: {' '.join(map(str, nums))}", " ".join(map(str, sorted(nums)))
    if kind == 1:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))
    if kind == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)
    if kind == 3:
        word = rng.choice(WORDS)
        return f"Spell the word '{word}' backwards.", word[::-1]
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 9)))
    return f"How many vowels are in '{word}'?", str(sum(c in "aeiou" for c in word))


def make_dataset(n_train: int, n_valid: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out chat records, the same for every method and run."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_valid:
        prompt, answer = make_task(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return records[:n_train], records[n_train:]


# budgets -------------------------------------------------------------------------------------------
def lora_params_per_layer(config, rank: int) -> int:
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    fan = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
           "up_proj": (h, i), "down_proj": (i, h)}
    return rank * sum(a + b for a, b in fan.values())


def s2ft_ratios(config, params_per_layer: int) -> tuple[float, float, int, int]:
    """(head_ratio, channel_ratio, heads, channels) for about `params_per_layer` parameters per layer: about
    half in o_proj head blocks ([hidden, head_dim] each), the rest in down_proj channels ([hidden, 1])."""
    h = config.hidden_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    heads = min(config.num_attention_heads, max(1, round(params_per_layer / 2 / (h * d))))
    channels = min(config.intermediate_size, max(1, round((params_per_layer - heads * h * d) / h)))
    return heads / config.num_attention_heads, channels / config.intermediate_size, heads, channels


# one method, in its own process --------------------------------------------------------------------
class PeakRSS:
    """Samples this process's resident set every few ms; `peak` in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def build_setup(method: str, spec, budget: dict):
    from workers.trainer import lora, s2ft
    from workers.trainer.sft import load_base, sft_setup

    if method == "lora":
        return lora.setup(spec)
    if method == "s2ft":
        return s2ft.setup(spec)
    model, tokenizer = load_base(spec.base_model_path)
    model.requires_grad_(True)
    params = dict(model.named_parameters())
    return sft_setup(spec, model, tokenizer, "full", params, save=lambda folder: folder)


def run_method(args: argparse.Namespace) -> dict:
    import torch

    from adapters_store.training_methods import validate_method
    from workers.trainer.training import TrainingHooks, TrainingLoop, TrainingSpec

    torch.set_num_threads(args.threads)
    budget = json.loads(args.budget)
    common = {"epochs": 1, "batch_size": args.batch, "max_seq_len": 256, "warmup_ratio": 0.1}
    method = {
        "lora": {"type": "lora", "rank": args.rank, "alpha": 2 * args.rank, "targets": LORA_TARGETS,
                 "lr": args.lr_lora},
        "s2ft": {"type": "s2ft", "head_ratio": budget["head_ratio"], "channel_ratio": budget["channel_ratio"],
                 "lr": args.lr_s2ft},
        "full": {"type": "lora", "lr": args.lr_full},  # only the loop's hyperparameters are used
    }[args.child]
    train, valid = make_dataset(args.steps * args.batch, args.eval)
    tmp = Path(tempfile.mkdtemp(prefix=f"finetune-bench-{args.child}-"))
    spec = TrainingSpec(validate_method({**method, **common}), args.model, train, valid, seed=0,
                        output_dir=tmp / "out", checkpoint_dir=tmp / "ckpt")
    torch.manual_seed(0)
    setup = build_setup(args.child, spec, budget)
    stamps: list[float] = []
    def on_step(report) -> None:
        stamps.append(time.perf_counter())
        print(f"  {args.child} step {report.step}/{report.total_steps} loss {report.loss:.3f} "
              f"({stamps[-1] - start:.0f} s)", file=sys.stderr, flush=True)

    hooks = TrainingHooks(on_step=on_step, checkpoint_every=0)
    loop = TrainingLoop(spec, hooks, setup)
    with PeakRSS() as mem:
        loaded = mem.peak  # the model as loaded, before any forward pass
        before = loop.evaluate(setup.valid_examples) if args.child == "lora" else None  # B = 0: the base itself
        start = time.perf_counter()
        result = loop.run()
    shutil.rmtree(tmp, ignore_errors=True)
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return {"method": args.child, "trainable_params": sum(p.numel() for p in setup.params.values()),
            "step_s": statistics.median(steps[min(2, len(steps) - 1):]), "steps": result.steps,
            "peak_rss_mb": mem.peak / 2**20, "train_extra_mb": (mem.peak - loaded) / 2**20,
            "train_loss": result.train_loss, "heldout_loss": result.validation_loss, "base_heldout_loss": before}


# the whole bench -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per method (one epoch)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval", type=int, default=24, help="held-out records")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr-full", type=float, default=5e-5)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-s2ft", type=float, default=1e-3)
    ap.add_argument("--previous", help="compare LoRA with this git revision's trainer instead (see the doc)")
    ap.add_argument("--rounds", type=int, default=2, help="--previous: alternating runs of each tree")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune_bench.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_method(args)))
        return

    from transformers import AutoConfig

    from workers.model.default_model import ensure_default_model

    args.model = str(args.model or ensure_default_model())
    if args.previous:
        return compare_previous(args)
    config = AutoConfig.from_pretrained(args.model)
    per_layer = lora_params_per_layer(config, args.rank)
    head_ratio, channel_ratio, heads, channels = s2ft_ratios(config, per_layer)
    budget = {"head_ratio": head_ratio, "channel_ratio": channel_ratio}
    results = {}
    for method in METHODS:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k not in ("child", "budget", "out") and v is not None]
        cmd = [sys.executable, __file__, *flags, "--child", method, "--budget", json.dumps(budget)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        r = results[method]
        print(f"{method:5s} {r['trainable_params']:>12,} params  step {r['step_s']:6.3f} s  "
              f"peak {r['peak_rss_mb']:7.0f} MB (+{r['train_extra_mb']:.0f})  held-out loss {r['heldout_loss']:.4f}",
              flush=True)
    full = results["full"]
    ratios = {}
    for m in ("lora", "s2ft"):
        ratios[f"{m}/full step time"] = results[m]["step_s"] / full["step_s"]
        ratios[f"{m}/full peak memory"] = results[m]["peak_rss_mb"] / full["peak_rss_mb"]
        extra = results[m]["train_extra_mb"] / full["train_extra_mb"]
        ratios[f"{m}/full training memory (over the loaded model)"] = extra
    ratios["s2ft/lora step time"] = results["s2ft"]["step_s"] / results["lora"]["step_s"]
    ratios["s2ft/lora trainable params"] = results["s2ft"]["trainable_params"] / results["lora"]["trainable_params"]
    losses = {"base (no training)": results["lora"]["base_heldout_loss"],
              **{m: results[m]["heldout_loss"] for m in METHODS}}
    report = {"config": {**{k: v for k, v in vars(args).items() if k not in ("child", "budget")},
                         "s2ft_heads_per_layer": heads, "s2ft_channels_per_layer": channels,
                         "train_records": args.steps * args.batch},
              "methods": results, "heldout_loss": losses, "ratios": ratios}
    for k, v in losses.items():
        print(f"held-out loss {k:20s} {v:.4f}")
    for k, v in ratios.items():
        print(f"{k:50s} {v:6.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


# this tree's LoRA vs a previous revision's ------------------------------------------------------------
def checkout(rev: str) -> Path:
    """A detached worktree of `rev` under /tmp (made once)."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", rev], check=True, text=True,
                         stdout=subprocess.PIPE).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"adapterd-{sha}"
    if not (path / "bench" / "finetune_bench.py").is_file():
        subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(path), sha], check=True)
    return path


def run_lora_child(tree: Path, args: argparse.Namespace) -> dict:
    flags = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in ("model", "threads", "steps", "batch", "eval",
                                                                    "rank", "lr-lora")]
    budget = json.dumps({"head_ratio": 0.1, "channel_ratio": 0.05})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "clients")])}
    out = subprocess.run([sys.executable, str(tree / "bench" / "finetune_bench.py"), *flags, "--child", "lora",
                          "--budget", budget], check=True, stdout=subprocess.PIPE, text=True, cwd=tree, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare_previous(args: argparse.Namespace) -> None:
    trees = {"current": Path(__file__).resolve().parents[1], "previous": checkout(args.previous)}
    runs: dict[str, list[dict]] = {"current": [], "previous": []}
    for i in range(args.rounds):
        for name in (("previous", "current") if i % 2 == 0 else ("current", "previous")):
            r = run_lora_child(trees[name], args)
            runs[name].append(r)
            print(f"round {i + 1} {name:8s} step {r['step_s']:6.3f} s  peak {r['peak_rss_mb']:7.0f} MB "
                  f"(+{r['train_extra_mb']:.0f})  held-out loss {r['heldout_loss']:.4f}", flush=True)
    ratio = lambda key: statistics.median(c[key] / p[key] for c, p in zip(runs["current"], runs["previous"]))
    ratios = {"step time (current / previous)": ratio("step_s"),
              "peak memory (current / previous)": ratio("peak_rss_mb"),
              "training memory over the loaded model (current / previous)": ratio("train_extra_mb")}
    report = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "budget", "out")},
              "previous_tree": str(trees["previous"]), "runs": runs, "ratios": ratios}
    for k, v in ratios.items():
        print(f"{k:60s} {v:6.3f}")
    out = Path(args.out).with_name("finetune_peft_vs_previous.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
