"""Device memory for LoRA weights, budgeted by rank: one pool of rank rows per (layer, target).

An adapter of rank r occupies r consecutive rows (modules of lower rank zero-padded), so a rank-8
adapter costs half a rank-16 one. Row 0 stays zero ("no adapter"). Scales are folded into B.
"""

from __future__ import annotations

import torch

from workers.adapters.lora import TARGETS, LoRAWeights, target_shapes
from workers.model.config import DecoderConfig

RowRange = tuple[int, int]  # [start, end) rows of one adapter; (0, 0) = the base model
NO_ADAPTER: RowRange = (0, 0)


class LoRARowBank:
    def __init__(self, base: DecoderConfig, num_rows: int, dtype: torch.dtype, device: torch.device,
                 targets: tuple[str, ...] = TARGETS):
        self.targets = targets
        self.num_rows = num_rows  # usable rows: 1..num_rows
        shapes = target_shapes(base)
        rows, layers = num_rows + 1, base.num_layers
        # a[t]: [layers, rows, in]; bt[t]: [layers, rows, out]
        self.a = {t: torch.zeros(layers, rows, shapes[t][0], dtype=dtype, device=device) for t in targets}
        self.bt = {t: torch.zeros(layers, rows, shapes[t][1], dtype=dtype, device=device) for t in targets}
        self.free: list[RowRange] = [(1, rows)]  # sorted, disjoint free ranges

    def views(self, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[target][layer], self.bt[target][layer]

    def can_allocate(self, rank: int) -> bool:
        return any(end - start >= rank for start, end in self.free)

    def allocate(self, rank: int) -> RowRange | None:
        """First fit; None when no free run of `rank` consecutive rows exists."""
        for i, (start, end) in enumerate(self.free):
            if end - start >= rank:
                if end - start == rank:
                    del self.free[i]
                else:
                    self.free[i] = (start + rank, end)
                return start, start + rank
        return None

    def release(self, rows: RowRange) -> None:
        self.clear(rows)
        merged = sorted([*self.free, rows])
        self.free = []
        for start, end in merged:  # coalesce neighbours
            if self.free and self.free[-1][1] == start:
                self.free[-1] = (self.free[-1][0], end)
            else:
                self.free.append((start, end))

    def write(self, rows: RowRange, weights: LoRAWeights) -> None:
        start, end = rows
        assert end - start == weights.rank
        self.clear(rows)
        for (layer, t), (a, b) in weights.modules.items():
            r = a.shape[0]
            self.a[t][layer, start:start + r] = a
            self.bt[t][layer, start:start + r] = (b * weights.scale(r)).T

    def clear(self, rows: RowRange) -> None:
        for t in self.targets:
            self.a[t][:, rows[0]:rows[1]].zero_()
            self.bt[t][:, rows[0]:rows[1]].zero_()

    @property
    def free_rows(self) -> int:
        return sum(end - start for start, end in self.free)
