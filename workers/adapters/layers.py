"""Adapter-aware linear layers, applied to the base model as a transform.

`attach_adapter_layers` wraps each targeted base linear in a `LoRALinear` that adds the per-row deltas
of the current step; the base model itself knows nothing of adapters. All wrappers read one shared
`AdapterContext`, which the engine refreshes once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from workers.adapters.lora_kernels import CANDIDATES, LoRAKernels
from workers.adapters.ops import AdapterBatch, lora_add_reference
from workers.adapters.slots import LoRARowBank
from workers.model.decoder import QuantizedLinear

LoRAKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AdapterBatch], None]
KERNELS: dict[str, LoRAKernel] = {**CANDIDATES, "reference": lora_add_reference}


class AdapterContext:
    """Per-step adapter metadata shared by every wrapped layer. kernel: "auto" (measured per shape and
    batch, workers.adapters.lora_kernels), or forced: one of KERNELS by name."""

    def __init__(self, kernel: str = "fast"):
        if kernel not in (*KERNELS, "auto"):
            raise ValueError(f"unknown LoRA kernel {kernel!r}; choose from auto, {', '.join(KERNELS)}")
        self.batch: AdapterBatch | None = None
        self.kernel: LoRAKernel = LoRAKernels() if kernel == "auto" else KERNELS[kernel]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | QuantizedLinear, a: torch.Tensor, bt: torch.Tensor, ctx: AdapterContext):
        super().__init__()
        self.base = base
        self.__dict__["direct"] = base  # base outside the module registry, called as direct.forward(x): no module
        # call (~3 µs: hook checks) per linear per step
        self.a, self.bt = a, bt  # views into the row bank: [rows, in], [rows, out]
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.direct.forward(x)  # [N, out]
        batch = self.ctx.batch
        if batch is not None and batch.active:
            self.ctx.kernel(y, x, self.a, self.bt, batch)
        return y


def attach_adapter_layers(model: nn.Module, bank: LoRARowBank, ctx: AdapterContext) -> None:
    for index, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for target in bank.targets:
                base = getattr(parent, target, None)
                if base is None:  # the target belongs to the other parent (attention or MLP)
                    continue
                if not isinstance(base, (nn.Linear, QuantizedLinear)):  # never skip a target silently
                    raise TypeError(f"layer {index} {target}: cannot add LoRA to a {type(base).__name__}")
                a, bt = bank.views(index, target)
                setattr(parent, target, LoRALinear(base, a, bt, ctx))
