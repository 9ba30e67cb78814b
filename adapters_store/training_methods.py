"""Fine-tune methods a job may ask for, and their hyperparameters: validated and normalised here, torch-free
(the gateway imports it to refuse a bad job before it is queued; the trainer trusts the result).

    validate_method({"type": "lora", "rank": 16})
    → {"type": "lora", "rank": 16, "alpha": 16.0, "targets": [all seven linears], "epochs": "auto", ...}
    validate_method({"type": "lora"}, examples=32)   # "auto" resolved (adapters_store.auto_hyperparameters)
    → {..., "epochs": 13, "batch_size": 4, "lr": 0.002, "learning_rate_multiplier": 10.0}

`epochs`, `batch_size`, `lr` and `learning_rate_multiplier` are each "auto" (the default) or a number.

Methods:
- `lora`: supervised fine-tuning of low-rank updates `B A` on the `targets` linears, scale `alpha / rank`.
- `s2ft`: structured-sparse fine-tuning: per layer, `head_ratio` of the attention heads (columns of `o_proj`,
  rows of `v_proj`) and `channel_ratio` of the FFN channels (columns of `down_proj`, rows of `up_proj`),
  selected at random (seeded), only those submatrices trained.
- `medusa`: Medusa-1 heads on the frozen base (or on `adapter`), trained by self-distillation on the base's
  own greedy continuations of the training prompts.
"""

from __future__ import annotations

import math
from typing import Any

from adapters_store.auto_hyperparameters import AUTO, resolve

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
S2FT_MODULES = ("o_proj", "down_proj", "v_proj", "up_proj")

# The loop's hyperparameters, shared by every method: name → (default, check, description of valid values).
_COMMON: dict[str, tuple[Any, Any, str]] = {
    "epochs": (AUTO, lambda v: v == AUTO or (_is_int(v) and 1 <= v <= 1000), '"auto" or an integer in [1, 1000]'),
    "batch_size": (AUTO, lambda v: v == AUTO or (_is_int(v) and 1 <= v <= 1024),
                   '"auto" or an integer in [1, 1024]'),
    "learning_rate_multiplier": (AUTO, lambda v: v == AUTO or (_is_num(v) and 0 < v <= 1000),
                                 '"auto" or a number in (0, 1000]'),
    "max_seq_len": (512, lambda v: _is_int(v) and 8 <= v <= 32768, "an integer in [8, 32768]"),
    "warmup_ratio": (0.03, lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (0.0, lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
}

_LR = (AUTO, lambda v: v == AUTO or (_is_num(v) and 0 < v <= 1), '"auto" or a number in (0, 1]')

_METHODS: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "lora": {
        "rank": (8, lambda v: _is_int(v) and 1 <= v <= 1024, "an integer in [1, 1024]"),
        "alpha": (16.0, lambda v: _is_num(v) and v > 0, "a positive number"),
        "targets": (list(LORA_TARGETS), lambda v: _is_subset(v, LORA_TARGETS),
                    f"a non-empty list of distinct modules from {list(LORA_TARGETS)}"),
        "lr": _LR,
    },
    "s2ft": {
        "head_ratio": (0.1, lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "channel_ratio": (0.05, lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "modules": (["o_proj", "down_proj"], lambda v: _is_subset(v, S2FT_MODULES),
                    f"a non-empty list of distinct modules from {list(S2FT_MODULES)}"),
        "lr": _LR,
    },
    "medusa": {
        "num_heads": (3, lambda v: _is_int(v) and 1 <= v <= 5, "an integer in [1, 5]"),
        "num_layers": (1, lambda v: _is_int(v) and 1 <= v <= 4, "an integer in [1, 4]"),
        "max_new_tokens": (128, lambda v: _is_int(v) and 1 <= v <= 4096,
                           "an integer in [1, 4096] (length of the self-distilled continuations)"),
        "adapter": (None, lambda v: v is None or (isinstance(v, str) and 0 < len(v) <= 256),
                    "null or an adapter name (distil the adapter's continuations instead of the base's)"),
        "lr": _LR,
    },
}
METHOD_TYPES = tuple(_METHODS)


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_num(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _is_subset(v: object, allowed: tuple[str, ...]) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(m, str) and m in allowed for m in v)
            and len(set(v)) == len(v))


def validate_method(method: dict, examples: int | None = None) -> dict:
    """{"type": ..., hyperparameters...} → the same with every default filled in (numbers as floats where
    the parameter is real-valued); with `examples` (the training file's record count) every "auto" is
    resolved. Raises ValueError naming the bad field."""
    if not isinstance(method, dict):
        raise ValueError("method must be an object with a 'type'")
    kind = method.get("type")
    if kind not in _METHODS:
        raise ValueError(f"method.type {kind!r} is not one of {list(METHOD_TYPES)}")
    spec = {**_METHODS[kind], **_COMMON}
    unknown = sorted(set(method) - set(spec) - {"type"})
    if unknown:
        raise ValueError(f"method {kind!r}: unknown hyperparameters {unknown}; allowed: {sorted(spec)}")
    out: dict[str, Any] = {"type": kind}
    for name, (default, ok, expected) in spec.items():
        value = method.get(name, default)
        if not ok(value):
            raise ValueError(f"method.{name}: {value!r} is not {expected}")
        if (isinstance(default, float) or name in ("lr", "learning_rate_multiplier")) and _is_num(value):
            value = float(value)
        out[name] = list(value) if isinstance(value, list) else value
    for check in _METHOD_CHECKS.get(kind, ()):
        check(out)
    if out["lr"] != AUTO and out["learning_rate_multiplier"] != AUTO:
        raise ValueError("method: lr and learning_rate_multiplier both set the learning rate; give one")
    return resolve(out, examples) if examples is not None else out


def _check_s2ft_budget(method: dict) -> None:
    """S²FT trains selected heads/channels: the ratios must select some in the modules it names."""
    heads = {"o_proj", "v_proj"} & set(method["modules"])
    channels = {"down_proj", "up_proj"} & set(method["modules"])
    if heads and method["head_ratio"] == 0 and channels and method["channel_ratio"] == 0:
        raise ValueError("method: head_ratio and channel_ratio are both 0, nothing would be trained")
    if heads and not channels and method["head_ratio"] == 0:
        raise ValueError(f"method.head_ratio: 0 but modules {sorted(heads)} select heads")
    if channels and not heads and method["channel_ratio"] == 0:
        raise ValueError(f"method.channel_ratio: 0 but modules {sorted(channels)} select channels")


_METHOD_CHECKS = {"s2ft": (_check_s2ft_budget,)}  # checks across one method's hyperparameters, by method type
