"""Preallocated device slots for LoRA weights: slot 0 is "no adapter", slots 1..max_loras hold one
adapter each, every module zero-padded to max_rank with its scale folded into B."""

from __future__ import annotations

import torch

from workers.adapters.lora import TARGETS, LoRAWeights, target_shapes
from workers.model.config import DecoderConfig


class LoRASlotBank:
    def __init__(self, base: DecoderConfig, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, targets: tuple[str, ...] = TARGETS):
        self.max_loras, self.max_rank, self.targets = max_loras, max_rank, targets
        slots, layers = max_loras + 1, base.num_layers
        shapes = target_shapes(base)
        # a[t]: [layers, slots, R, in]; bt[t]: [layers, slots, R, out]
        self.a = {t: torch.zeros(layers, slots, max_rank, shapes[t][0], dtype=dtype, device=device) for t in targets}
        self.bt = {t: torch.zeros(layers, slots, max_rank, shapes[t][1], dtype=dtype, device=device) for t in targets}

    def views(self, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[target][layer], self.bt[target][layer]

    def write(self, slot: int, weights: LoRAWeights) -> None:
        assert 1 <= slot <= self.max_loras
        for t in self.targets:
            self.a[t][:, slot].zero_()
            self.bt[t][:, slot].zero_()
        for (layer, t), (a, b) in weights.modules.items():
            r = a.shape[0]
            self.a[t][layer, slot, :r] = a
            self.bt[t][layer, slot, :r] = (b * weights.scale(r)).T

    def clear(self, slot: int) -> None:
        for t in self.targets:
            self.a[t][:, slot].zero_()
            self.bt[t][:, slot].zero_()
