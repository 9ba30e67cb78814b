"""The "auto" rule: epochs, batch size and learning rate from the number of training examples, so that a
small file still gets enough optimizer steps to learn and a large one is not over-trained. Torch-free (the
gateway resolves a job's "auto" values when it is created, so the job shows what it will run).

With n training examples:

- batch_size = the power of two nearest below n / 256, clamped to [4, 32]
  (n < 2048 → 4, ~4k → 16, ≥ 8k → 32);
- n_epochs = ceil(150 / steps_per_epoch) (steps_per_epoch = ceil(n / batch_size)), at least 3, at most 100,
  and never more than ceil(100_000 / n) (examples seen ≤ ~100k): a few dozen examples get ≥ 150 optimizer
  steps, a few hundred or more get 3 epochs, 50k+ get 1–2;
- learning_rate_multiplier = 10 below 1k examples, 5 below 10k, else 2.5; the learning rate is the
  method's base rate times it (base: lora 2e-4, s2ft 2e-4, medusa 1e-4). Small files need a large step to
  move an adapter in ~150 steps; large ones take many steps and a smaller rate.

An explicit number always wins over the rule; an explicit `lr` sets the multiplier to lr / base.
"""

from __future__ import annotations

import math

AUTO = "auto"
TARGET_STEPS = 150
MIN_EPOCHS, MAX_EPOCHS = 3, 100
MAX_EXAMPLES_SEEN = 100_000
BASE_LR = {"lora": 2e-4, "s2ft": 2e-4, "medusa": 1e-4}


def auto_batch_size(examples: int) -> int:
    ratio = max(1, examples // 256)
    return min(32, max(4, 1 << (ratio.bit_length() - 1)))


def auto_epochs(examples: int, batch_size: int) -> int:
    steps_per_epoch = max(1, math.ceil(examples / batch_size))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return max(1, min(epochs, math.ceil(MAX_EXAMPLES_SEEN / max(1, examples))))


def auto_lr_multiplier(examples: int) -> float:
    if examples < 1_000:
        return 10.0
    return 5.0 if examples < 10_000 else 2.5


def resolve(method: dict, examples: int) -> dict:
    """The validated method with every "auto" replaced by the rule's value for `examples` training examples;
    `lr` and `learning_rate_multiplier` both set (lr = base × multiplier)."""
    out = dict(method)
    n = max(1, examples)
    if out["batch_size"] == AUTO:
        out["batch_size"] = auto_batch_size(n)
    if out["epochs"] == AUTO:
        out["epochs"] = auto_epochs(n, out["batch_size"])
    base = BASE_LR[out["type"]]
    if out["lr"] != AUTO:
        out["learning_rate_multiplier"] = out["lr"] / base
    else:
        multiplier = out["learning_rate_multiplier"]
        multiplier = auto_lr_multiplier(n) if multiplier == AUTO else float(multiplier)
        out["lr"], out["learning_rate_multiplier"] = base * multiplier, multiplier
    return out


def is_resolved(method: dict) -> bool:
    return AUTO not in (method["epochs"], method["batch_size"], method["lr"])
