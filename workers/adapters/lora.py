"""LoRA adapters in PEFT format: parse `adapter_config.json` + `adapter_model.safetensors`, validate
against the base model, and hold one adapter's tensors.

Keys look like `base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight` ([r, in]) and
`...lora_B.weight` ([out, r]); the delta is `scale · B (A x)` with scale `alpha / r`, or `alpha / √r`
with rsLoRA. Nothing is loaded unless every check passes; pickle files are refused outright.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store.base_model import TARGETS as TARGETS  # re-exported: the LoRA-able modules
from adapters_store.base_model import lora_target_shapes
from adapters_store.errors import StoreError
from adapters_store.validation import CONFIG_NAME, LORA_KEY, PICKLE_SUFFIXES, check_lora_modules, parse_config
from workers.errors import AdapterValidationError
from workers.model.config import DecoderConfig


def target_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear of the base."""
    return lora_target_shapes(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)


@dataclass(frozen=True)
class LoRAWeights:
    """One adapter: per (layer, target) the pair (A [r, in], B [out, r]) and its scale."""

    kind = "lora"  # held by the LoRA kind's device (workers.adapters.lora_kind)
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

    @property
    def parts(self) -> tuple[LoRAWeights]:
        return (self,)


def read_config(folder: Path) -> dict:
    """adapter_config.json, checked by the store's one LoRA config check (`adapters_store.validation`)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterValidationError(f"{folder.name}: no {CONFIG_NAME}")
    with store_errors():
        return parse_config(path.read_bytes())


@contextmanager
def store_errors() -> Iterator[None]:
    """The store's checks raise `StoreError`s; on the worker they are `AdapterValidationError`s."""
    try:
        yield
    except StoreError as e:
        raise AdapterValidationError(e.message) from e


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
    """Checked by the store's one LoRA key/shape check (`check_lora_modules`), then dtypes and values."""
    with store_errors():
        check_lora_modules({k: tuple(t.shape) for k, t in tensors.items()}, target_shapes(base), base.num_layers,
                           max_rank)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterValidationError(f"{key}: dtype {tensor.dtype} is not floating point")
        m = LORA_KEY.search(key)
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]
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
    fusable = True

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



