"""LoRA adapters in PEFT format: parse `adapter_config.json` + `adapter_model.safetensors`, validate
against the base model, and hold one adapter's tensors.

Keys look like `base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]); the delta is `scale · B (A x)` with scale `alpha / r`, or `alpha / √r`
with rsLoRA. Nothing is loaded unless every check passes; pickle files are refused outright.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store.base_model import TARGETS, lora_target_shapes
from adapters_store.validation import LORA_KEY, PICKLE_SUFFIXES
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig

_UNSUPPORTED_OPTIONS = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True}


def target_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear of the base."""
    return lora_target_shapes(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter: per (layer, target) the pair (A [r, in], B [out, r]) and its scale."""

    rank: int  # the largest rank of any module
    alpha: float
    use_rslora: bool
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    def scale(self, rank: int) -> float:
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank

    @property
    def targets(self) -> set[str]:
        return {t for _, t in self.modules}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def read_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no adapter_config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterValidationError(f"adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterValidationError("adapter_config.json must be a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterValidationError(f"adapter_config.json: peft_type {peft_type!r} is not a LoRA")
    for option, bad in _UNSUPPORTED_OPTIONS.items():
        if cfg.get(option) == bad:
            raise AdapterValidationError(f"adapter_config.json: unsupported option {option}={bad}")
    if cfg.get("bias", "none") != "none":
        raise AdapterValidationError("adapter_config.json: unsupported option bias != 'none'")
    if cfg.get("modules_to_save"):
        raise AdapterValidationError("adapter_config.json: unsupported option modules_to_save")
    for option in ("alpha_pattern", "trainable_token_indices", "target_parameters"):
        if cfg.get(option):
            raise AdapterValidationError(f"adapter_config.json: unsupported option {option}")
    return cfg


def read_tensor_bytes(folder: Path) -> bytes:
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise AdapterValidationError(f"pickle files are refused ({', '.join(pickles)}); use safetensors")
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no adapter_model.safetensors")
    return path.read_bytes()


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterValidationError(f"adapter_model.safetensors is not a valid safetensors file: {e}") from e


def _all_finite(*tensors: torch.Tensor) -> bool:
    """A sum is finite when every entry is (NaN and ±inf propagate); only an overflowing sum of finite
    values needs the entry-wise check."""
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


def parse_lora(cfg: dict, tensors: dict[str, torch.Tensor], base: DecoderConfig, max_rank: int) -> LoRAWeights:
    shapes = target_shapes(base)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = LORA_KEY.search(key)
        if m is None:
            raise AdapterValidationError(f"unsupported tensor {key!r}: only lora_A/lora_B of {', '.join(TARGETS)}")
        layer, target, which = int(m.group(1)), m.group(2), m.group(3)
        if target not in shapes:
            raise AdapterValidationError(f"{key}: unsupported target module {target!r}")
        if layer >= base.num_layers:
            raise AdapterValidationError(f"{key}: layer {layer} but the base has {base.num_layers} layers")
        if not tensor.is_floating_point():
            raise AdapterValidationError(f"{key}: dtype {tensor.dtype} is not floating point")
        pairs.setdefault((layer, target), {})[which] = tensor
    if not pairs:
        raise AdapterValidationError("the adapter holds no LoRA tensors")
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterValidationError(f"layers.{layer}.{target}: lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = shapes[target]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):
            raise AdapterValidationError(
                f"layers.{layer}.{target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"(expected [r, {fan_in}] and [{fan_out}, r])")
        if r < 1 or r > max_rank:
            raise AdapterValidationError(f"layers.{layer}.{target}: rank {r} exceeds max_rank {max_rank}"
                                         if r > max_rank else f"layers.{layer}.{target}: rank {r}")
        if not _all_finite(a, b):
            raise AdapterValidationError(f"layers.{layer}.{target}: non-finite values")
        modules[(layer, target)] = (a.float(), b.float())
    rank = max(a.shape[0] for a, _ in modules.values())
    alpha = float(cfg.get("lora_alpha", cfg.get("r", rank)))
    return LoRAWeights(rank=rank, alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)), modules=modules)


@dataclass(frozen=True)
class LoRASource:
    """A validated LoRA as the host cache keeps it: its config and the safetensors bytes as stored,
    decoded into tensors only when it moves into device rows."""

    config: dict
    data: bytes
    rank: int
    targets: frozenset[str]
    kind = "lora"

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def decode(self, base: DecoderConfig) -> LoRAWeights:
        return parse_lora(self.config, decode_tensors(self.data), base, self.rank)


def read_lora(folder: str | Path, base: DecoderConfig, max_rank: int) -> tuple[LoRASource, LoRAWeights]:
    """Reads and fully validates a PEFT folder; returns the bytes to keep and the decoded weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"adapter folder {str(folder)!r} does not exist")
    config, data = read_config(folder), read_tensor_bytes(folder)
    weights = parse_lora(config, decode_tensors(data), base, max_rank)
    return LoRASource(config, data, weights.rank, frozenset(weights.targets)), weights



