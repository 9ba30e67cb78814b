"""ComPEFT quality benchmark (issue 4): train a real LoRA, compress it, measure size and held-out loss.

    .venv/bin/python bench/compeft_quality.py     # SmolLM2-135M-Instruct, 2 threads: ~10 min training + ~10 min sweep
    .venv/bin/python bench/compeft_quality.py --adapter-cache /tmp/lora.npz   # keep / reuse the trained LoRA

1. Task: a templated instruction mix generated locally and deterministically (seeded): reverse a short
   word list, rewrite an ISO date as "Month D, YYYY", add two 2-digit numbers. Prompts are unique across
   the train / validation / test splits (disjoint by construction). The base model does poorly on the
   exact formats, so the adapter matters.
2. Training: `peft` LoRA r=16, alpha=32 on all seven linear projections, AdamW, linear warm-up then
   linear decay, loss on the completion tokens only.
3. Compression: `adapters_store.compeft` (the codec the server uses, format 2): τ = the LoRA A and B
   tensors themselves; each tensor keeps its own top-k by magnitude at each density and is ternarised to
   sign(τ) · α · std(that tensor). Size = bytes of its encoded file; ratio = the fp16 PEFT
   `adapter_model.safetensors` (saved by `peft`) over that. The encoded bytes are decoded again and loaded
   into the model for evaluation, so the loss is that of what a worker would serve.
   Variant `per_tensor` is the codec. Variant `global` is a diagnostic, the original ComPEFT definition
   (format 1): one top-k over all tensors concatenated and one scale α · std(all of τ); computed here in
   numpy and stored through the same format (`compeft.from_ternary`), so its size is comparable. With
   peft's init (A random, B zero) B's entries end far smaller than A's and one global top-k drops most of B.
4. α: as in the ComPEFT paper, α is chosen per density (and variant) by the loss on a separate small
   validation split; the held-out test loss is reported for that α. The validation loss of every grid
   point is in the JSON.

Reports, per (variant, density, chosen α): size, ratio vs fp16 PEFT, held-out test loss, Δ vs the
uncompressed LoRA, the share of the LoRA's gain over the base kept, the base model's loss; and which points
meet the target (≥ 16× smaller at ≤ 2 % loss increase).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters_store import compeft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 16.0
TARGET_LOSS_INCREASE_PCT = 2.0

WORDS = (
    "apple river stone cloud tiger lamp garden window pencil ocean mirror candle forest rocket violin "
    "harbor button desert planet ladder meadow copper jacket island kettle lemon marble needle orchard "
    "pepper quartz saddle tunnel velvet wagon anchor basket cactus dragon engine falcon glacier hammer "
    "igloo jungle kitten lantern magnet nectar oyster parrot rabbit silver tomato umbrella valley walrus"
).split()
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


# ---------------------------------------------------------------------------------------------- task


def make_example(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    if kind == 0:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return Example(f"Reverse the list: {', '.join(words)}", ", ".join(reversed(words)))
    if kind == 1:
        year, month = rng.randint(1950, 2049), rng.randrange(12)
        day = rng.randint(1, DAYS_IN_MONTH[month])
        return Example(f"Write the date {year:04d}-{month + 1:02d}-{day:02d} in words",
                       f"{MONTHS[month]} {day}, {year}")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"Add {a} and {b}", str(a + b))


def make_splits(seed: int, n_train: int, n_val: int, n_test: int) -> tuple[list[Example], ...]:
    """Unique prompts, so the three splits are disjoint; the same seed gives the same splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n_train + n_val + n_test:
        ex = make_example(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[:n_train], out[n_train:n_train + n_val], out[n_train + n_val:]


def render_prompt(ex: Example) -> str:
    return f"{ex.prompt}\nAnswer:"


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    n_prompt: int  # tokens before the completion; the loss is on ids[n_prompt:]


def encode(tokenizer, examples: list[Example]) -> list[Encoded]:
    out = []
    for ex in examples:
        prompt = tokenizer(render_prompt(ex), add_special_tokens=False)["input_ids"]
        completion = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Encoded(prompt + completion, len(prompt)))
    return out


def collate(batch: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the completion tokens (the loss targets)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # ids: [b, t]
    attn = torch.zeros((len(batch), width), dtype=torch.long)  # attn: [b, t]
    target = torch.zeros((len(batch), width), dtype=torch.bool)  # target: [b, t]
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        attn[i, :len(e.ids)] = 1
        target[i, e.n_prompt:len(e.ids)] = True
    return ids, attn, target


# ------------------------------------------------------------------------------------ loss / training


def completion_nll(model, ids: torch.Tensor, attn: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over completion tokens. The vocab projection runs only where a target is predicted."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=ids, attention_mask=attn).last_hidden_state  # hidden: [b, t, d]
    predicts = target[:, 1:]  # position p predicts token p+1
    h = hidden[:, :-1][predicts]  # h: [n, d]
    logits = causal_lm.lm_head(h).float()  # logits: [n, vocab]
    labels = ids[:, 1:][predicts]  # labels: [n]
    return F.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


@torch.no_grad()
def mean_loss(model, data: list[Encoded], pad_id: int, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        nll, n = completion_nll(model, *collate(data[i:i + batch_size], pad_id))
        total, count = total + float(nll), count + n
    return total / count


def train(model, data: list[Encoded], pad_id: int, steps: int, batch_size: int, lr: float, seed: int,
          log_every: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        nll, n = completion_nll(model, *collate(batch, pad_id))
        loss = nll / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            print(f"  step {step + 1:4d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------- adapter tensors


def lora_tensors(model) -> dict[str, np.ndarray]:
    """The PEFT-format LoRA tensors (the keys `adapter_model.safetensors` holds), float32 copies (not views of
    the live parameters, which later loads overwrite)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_tensors(model, tensors: dict[str, np.ndarray]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: torch.from_numpy(np.ascontiguousarray(v))
                                               for k, v in tensors.items()})
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, f"unexpected LoRA keys: {unexpected[:3]}"


def fp16_peft_file_bytes(model, folder: Path) -> int:
    """Saves the adapter with `peft` in fp16 and returns the size of its adapter_model.safetensors."""
    from safetensors import safe_open

    state = {k: v.detach().half() for k, v in model.state_dict().items() if "lora_" in k}
    model.save_pretrained(folder, state_dict=state)
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}, f"expected an fp16 PEFT file, got {dtypes}"
    return path.stat().st_size


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct, converted once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--train-examples", type=int, default=2400)
    ap.add_argument("--val-examples", type=int, default=32, help="chooses α per density")
    ap.add_argument("--test-examples", type=int, default=96, help="held out: the reported losses")
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--densities", default="0.05,0.10,0.20,0.30")
    ap.add_argument("--alphas", default="1,1.5,2,2.5,3,3.5,4,5,6,8,12")
    ap.add_argument("--variants", default="per_tensor,global", help="per_tensor = the codec (format 2); "
                    "global = diagnostic, one top-k and one scale over all tensors (format 1's definition)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--adapter-cache", help="an .npz: the trained LoRA is saved there, or loaded if present "
                    "(same flags assumed), so the compression sweep can be re-run without training")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compeft_quality.json"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model:
        model_path = Path(args.model)
    else:
        from workers.model.default_model import ensure_default_model

        model_path = ensure_default_model()
    densities = [float(d) for d in args.densities.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    variants = args.variants.split(",")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_ex, val_ex, test_ex = make_splits(args.seed, args.train_examples, args.val_examples, args.test_examples)
    train_data, val_data, test_data = (encode(tokenizer, s) for s in (train_ex, val_ex, test_ex))
    print(f"task: {len(train_data)} train / {len(val_data)} val / {len(test_data)} test examples, "
          f"e.g. {render_prompt(test_ex[0])!r} -> {test_ex[0].answer!r}", flush=True)

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=TARGETS,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    evaluate = lambda data: mean_loss(model, data, pad_id, args.eval_batch)  # noqa: E731

    t0 = time.perf_counter()
    with model.disable_adapter():
        base_val, base_test = evaluate(val_data), evaluate(test_data)
    print(f"base: val {base_val:.4f}  test {base_test:.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"training LoRA r={args.rank} alpha={args.lora_alpha:g} on {', '.join(TARGETS)}: "
          f"{args.steps} steps x batch {args.batch}, lr {args.lr:g}", flush=True)
    t0 = time.perf_counter()
    cache = Path(args.adapter_cache) if args.adapter_cache else None
    from_cache = bool(cache and cache.is_file())
    if from_cache:  # a re-run of the compression sweep only
        with np.load(cache) as saved:
            load_lora_tensors(model, {k: saved[k] for k in saved.files if k != "__losses__"})
            losses = saved["__losses__"].tolist()
        print(f"  loaded the trained LoRA from {cache}", flush=True)
    else:
        losses = train(model, train_data, pad_id, args.steps, args.batch, args.lr, args.seed, args.log_every)
        if cache:
            np.savez(cache, __losses__=np.array(losses), **lora_tensors(model))
    train_s = time.perf_counter() - t0
    trained = lora_tensors(model)
    lora_val, lora_test = evaluate(val_data), evaluate(test_data)
    print(f"LoRA: val {lora_val:.4f}  test {lora_test:.4f}  (trained in {train_s:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        fp16_bytes = fp16_peft_file_bytes(model, Path(tmp) / "fp16")
    n_params = sum(v.size for v in trained.values())
    a_abs = np.concatenate([np.abs(v).ravel() for k, v in trained.items() if "lora_A" in k])
    b_abs = np.concatenate([np.abs(v).ravel() for k, v in trained.items() if "lora_B" in k])

    rows = []
    for variant in variants:
        for density in densities:
            for alpha in alphas:
                blobs, dense = compress_variant(trained, variant, density, alpha)
                load_lora_tensors(model, dense)
                size = sum(len(b) for b in blobs)
                rows.append({
                    "variant": variant, "density": density, "alpha": alpha, "size_bytes": size,
                    "ratio_vs_fp16_peft": fp16_bytes / size, "val_loss": evaluate(val_data), "test_loss": None,
                    "delta_vs_lora_pct": None, "gain_kept_pct": None, "chosen_by_val": False, "meets_target": False,
                    "kept_entries": sum(int(np.count_nonzero(v)) for v in dense.values()),
                    "kept_in_lora_B": sum(int(np.count_nonzero(v)) for k, v in dense.items() if "lora_B" in k),
                })
                r = rows[-1]
                print(f"  {variant:10s} density {density:.2f} alpha {alpha:<4g} {size:>9,d} B  "
                      f"{r['ratio_vs_fp16_peft']:6.1f}x  val {r['val_loss']:.4f}  "
                      f"({r['kept_in_lora_B']:,d} of {r['kept_entries']:,d} kept entries in B)", flush=True)
            best = min((r for r in rows if r["variant"] == variant and r["density"] == density),
                       key=lambda r: r["val_loss"])
            _, dense = compress_variant(trained, variant, density, best["alpha"])
            load_lora_tensors(model, dense)
            best["test_loss"] = evaluate(test_data)
            best["delta_vs_lora_pct"] = 100.0 * (best["test_loss"] - lora_test) / lora_test
            best["gain_kept_pct"] = 100.0 * (base_test - best["test_loss"]) / (base_test - lora_test)
            best["chosen_by_val"] = True
            best["meets_target"] = (best["ratio_vs_fp16_peft"] >= TARGET_RATIO
                                    and best["delta_vs_lora_pct"] <= TARGET_LOSS_INCREASE_PCT)
            print(f"  -> {variant} density {density:.2f}: alpha {best['alpha']:g} chosen on val; test "
                  f"{best['test_loss']:.4f} ({best['delta_vs_lora_pct']:+.2f} % vs LoRA)", flush=True)
    load_lora_tensors(model, trained)
    chosen = [r for r in rows if r["chosen_by_val"]]
    verdict = summarise([r for r in chosen if r["variant"] == "per_tensor"],
                        [r for r in chosen if r["variant"] != "per_tensor"])

    report = {
        "benchmark": "compeft_quality",
        "model": str(model_path.name),
        "task": "templated mix: reverse a 3-5 word list / ISO date to 'Month D, YYYY' / add two 2-digit numbers",
        "splits": {"train": len(train_data), "val": len(val_data), "test": len(test_data), "disjoint": True},
        "training": {"rank": args.rank, "lora_alpha": args.lora_alpha, "targets": TARGETS, "steps": args.steps,
                     "batch": args.batch, "lr": args.lr, "optimizer": "AdamW, linear warm-up 10 % then decay",
                     "seconds": None if from_cache else train_s, "adapter_from_cache": from_cache,
                     "first_loss": losses[0] if losses else None,
                     "last_loss_mean_25": float(np.mean(losses[-25:])) if losses else None},
        "alpha_selection": "per density, lowest validation-split loss (as the ComPEFT paper); test loss for that alpha",
        "codec_format_version": compeft.FORMAT_VERSION,
        "variants": {"per_tensor": "the codec (format 2): each A and B tensor keeps its own top-k and its own "
                                   "scale alpha * std(that tensor)",
                     "global": "diagnostic, format 1's definition: one top-k and one scale alpha * std over all "
                               "tensors concatenated; stored through format 2 (from_ternary) for the size"},
        "lora_params": int(n_params),
        "lora_abs_mean": {"A": float(a_abs.mean()), "B": float(b_abs.mean())},
        "fp16_peft_file_bytes": fp16_bytes,
        "base_loss": {"val": base_val, "test": base_test},
        "lora_loss": {"val": lora_val, "test": lora_test},
        "target": {"min_ratio": TARGET_RATIO, "max_loss_increase_pct": TARGET_LOSS_INCREASE_PCT},
        "rows": rows,
        "table": [{k: r[k] for k in ("variant", "density", "alpha", "size_bytes", "ratio_vs_fp16_peft",
                                      "test_loss", "delta_vs_lora_pct", "gain_kept_pct", "meets_target")}
                  | {"base_loss": base_test}
                  for r in chosen],
        "meets_target": [{"variant": r["variant"], "density": r["density"], "alpha": r["alpha"]}
                         for r in chosen if r["meets_target"]],
        "verdict": verdict,
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")


def compress_variant(trained: dict[str, np.ndarray], variant: str, density: float,
                     alpha: float) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """Encodes with `adapters_store.compeft`, decodes the bytes back: (the encoded files, the dense LoRA)."""
    if variant == "per_tensor":
        ternary = compeft.compress(trained, density, alpha)
    elif variant == "global":
        ternary = compeft.from_ternary(global_ternary(trained, density, alpha))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    blob = ternary.encode()
    decoded = compeft.decode(blob)
    assert np.array_equal(decoded.positions, ternary.positions) and np.array_equal(decoded.scales, ternary.scales)
    return [blob], decoded.to_dense()


def global_ternary(trained: dict[str, np.ndarray], density: float, alpha: float) -> dict[str, np.ndarray]:
    """Format 1's definition: one top-k over all tensors concatenated (name order), one scale α · std(τ)."""
    names = sorted(trained)
    tau = np.concatenate([trained[n].astype(np.float64).ravel() for n in names])  # tau: [total]
    k = min(tau.size, max(1, round(density * tau.size)))
    kept = np.argpartition(np.abs(tau), tau.size - k)[tau.size - k:]
    scale = np.float32(alpha * tau.std())
    flat = np.zeros(tau.size, dtype=np.float32)
    flat[kept] = np.where(tau[kept] > 0, scale, -scale)
    out, start = {}, 0
    for n in names:
        out[n] = flat[start:start + trained[n].size].reshape(trained[n].shape)
        start += trained[n].size
    return out


def summarise(chosen: list[dict], diagnostic: list[dict]) -> str:
    meeting = [r for r in chosen if r["meets_target"]]
    if meeting:
        r = max(meeting, key=lambda r: r["ratio_vs_fp16_peft"])
        return (f"target met: density {r['density']:g}, alpha {r['alpha']:g} (chosen on validation) is "
                f"{r['ratio_vs_fp16_peft']:.1f}x smaller at {r['delta_vs_lora_pct']:+.2f} % held-out loss")
    small = [r for r in chosen if r["ratio_vs_fp16_peft"] >= TARGET_RATIO]
    if small:
        r = min(small, key=lambda r: r["delta_vs_lora_pct"])
        line = (f"target not met: the closest >= {TARGET_RATIO:g}x point is density {r['density']:g}, alpha "
                f"{r['alpha']:g} ({r['ratio_vs_fp16_peft']:.1f}x) at {r['delta_vs_lora_pct']:+.2f} % held-out loss")
    else:
        r = max(chosen, key=lambda r: r["ratio_vs_fp16_peft"])
        line = f"target not met: no density reaches {TARGET_RATIO:g}x (best {r['ratio_vs_fp16_peft']:.1f}x)"
    extra = [r for r in diagnostic if r["meets_target"]]
    if extra:
        r = max(extra, key=lambda r: r["ratio_vs_fp16_peft"])
        line += (f"; the {r['variant']} diagnostic meets it at density {r['density']:g}, alpha {r['alpha']:g} "
                 f"({r['ratio_vs_fp16_peft']:.1f}x, {r['delta_vs_lora_pct']:+.2f} %)")
    return line


def print_table(report: dict) -> None:
    base, lora = report["base_loss"]["test"], report["lora_loss"]["test"]
    print(f"\nfp16 PEFT file: {report['fp16_peft_file_bytes']:,d} bytes ({report['lora_params']:,d} LoRA params)")
    print(f"held-out loss: base {base:.4f}   uncompressed LoRA {lora:.4f}")
    print("\nalpha sweep (validation loss):")
    for r in report["rows"]:
        print(f"  {r['variant']:10s} {r['density']:>5.2f} alpha {r['alpha']:<4g} val {r['val_loss']:.4f}"
              f"{'  <- chosen' if r['chosen_by_val'] else ''}")
    print(f"\n{'variant':10s} {'density':>7} {'alpha':>5} {'bytes':>10} {'ratio':>7} {'test':>7} {'Δ vs LoRA':>9} "
          f"{'gain kept':>9} {'base':>7}  target")
    for r in report["table"]:
        print(f"{r['variant']:10s} {r['density']:>7.2f} {r['alpha']:>5g} {r['size_bytes']:>10,d} "
              f"{r['ratio_vs_fp16_peft']:>6.1f}x {r['test_loss']:>7.4f} {r['delta_vs_lora_pct']:>+8.2f}% "
              f"{r['gain_kept_pct']:>8.1f}% {base:>7.4f}  {'MET' if r['meets_target'] else '-'}")
    print(report["verdict"])


if __name__ == "__main__":
    main()
