"""Fusing one adapter into the base weights, in place, and restoring them bit-exactly.

LoRA: `W += scale · B A` for every module it targets; S²FT: `W[:, idx] += C` (columns) or
`W[idx, :] += C` (rows). What fusing overwrites is kept and copied back on unfuse — never subtracted, so
the base is restored to the bit however many times an adapter is fused and unfused.

This is the mechanism only: while an adapter is fused, every row of the model sees it. Serving other
rows correctly at the same time (with a correction delta) and the policy that decides when to fuse are
not built yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.adapters.lora import LoRAWeights
from workers.adapters.s2ft import MODULES as S2FT_MODULES
from workers.adapters.s2ft import S2FTWeights

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class SavedWeights:
    """What fusing overwrote in one base weight: all of it (LoRA), or the selected columns or rows."""

    kind: str  # "full" | "col" | "row"
    index: torch.Tensor | None  # [k] for col / row
    values: torch.Tensor


def base_weight(model: nn.Module, layer: int, module: str) -> torch.Tensor:
    """The base linear's weight [out, in] under any adapter wrappers (each keeps the wrapped one as `.base`)."""
    linear = getattr(getattr(model.model.layers[layer], _PARENT[module]), module)
    while hasattr(linear, "base"):
        linear = linear.base
    return linear.weight


class WeightFusion:
    def __init__(self, model: nn.Module):
        self.model = model
        self.fused: str | None = None
        self.saved: dict[tuple[int, str], SavedWeights] = {}

    @torch.no_grad()
    def fuse(self, name: str, weights: LoRAWeights | S2FTWeights) -> None:
        if self.fused is not None:
            raise RuntimeError(f"adapter {self.fused!r} is fused already; unfuse it first")
        if isinstance(weights, LoRAWeights):
            for (layer, module), (a, b) in weights.modules.items():
                w = base_weight(self.model, layer, module)  # [out, in]
                self.saved[(layer, module)] = SavedWeights("full", None, w.clone())
                w.add_((weights.scale(a.shape[0]) * (b @ a)).to(w.dtype))
        else:
            for (layer, module), update in weights.modules.items():
                assert S2FT_MODULES[module][1] == update.kind
                w = base_weight(self.model, layer, module)
                idx = update.index.to(w.device)
                if update.kind == "col":
                    self.saved[(layer, module)] = SavedWeights("col", idx, w[:, idx].clone())
                    w[:, idx] += update.delta.to(w.dtype)  # [out, k]
                else:
                    self.saved[(layer, module)] = SavedWeights("row", idx, w[idx, :].clone())
                    w[idx, :] += update.delta.to(w.dtype)  # [k, in]
        self.fused = name

    @torch.no_grad()
    def unfuse(self) -> str | None:
        """Restores every overwritten value; returns the adapter that was fused (None if none was)."""
        for (layer, module), saved in self.saved.items():
            w = base_weight(self.model, layer, module)
            if saved.kind == "full":
                w.copy_(saved.values)
            elif saved.kind == "col":
                w[:, saved.index] = saved.values
            else:
                w[saved.index, :] = saved.values
        self.saved.clear()
        name, self.fused = self.fused, None
        return name
