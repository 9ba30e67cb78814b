"""The LoRA kind (PEFT folders, `workers.adapters.lora`): its device is the rank-budgeted row bank
(`slots.LoRARowBank`) with `LoRALinear` wrappers reading the per-step `AdapterBatch`; fusing is
`W += scale · B A`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from adapters_store.validation import SAFETENSORS_NAME
from workers.adapters.kind import AdapterKind, DeviceContext, ReadContext, SavedWeights, base_weight
from workers.adapters.layers import AdapterContext, attach_adapter_layers
from workers.adapters.lora import LoRASource, LoRAWeights, read_lora
from workers.adapters.ops import RowRanges, build_adapter_batch
from workers.adapters.slots import LoRARowBank, RowRange
from workers.errors import AdapterValidationError


def check_lora_targets(targets: frozenset[str], ctx: ReadContext) -> None:
    missing = targets - set(ctx.lora_targets)
    if missing:
        raise AdapterValidationError(f"target modules {sorted(missing)} are not enabled on this worker")


class LoRADevice:
    def __init__(self, model: nn.Module, ctx: DeviceContext):
        self.dtype, self.device = ctx.dtype, ctx.device
        self.bank = LoRARowBank(ctx.base, ctx.max_adapters * ctx.max_rank, ctx.dtype, ctx.device, ctx.lora_targets)
        self.layers = AdapterContext(ctx.kernel)
        attach_adapter_layers(model, self.bank, self.layers)

    def check(self, source) -> None:
        rank = getattr(source, "rank", 0)  # sources with a LoRA part have a rank
        if rank > self.bank.num_rows:
            raise AdapterValidationError(f"rank {rank} exceeds this worker's {self.bank.num_rows} LoRA rows")

    def fits(self, part: LoRAWeights) -> bool:
        return self.bank.can_allocate(part.rank)

    def place(self, part: LoRAWeights) -> RowRange:
        rows = self.bank.allocate(part.rank)
        self.bank.write(rows, part)
        return rows

    def free(self, rows: RowRange) -> None:
        self.bank.release(rows)

    def set_batch(self, decode: list[RowRanges], chunks: list[tuple[int, int, RowRanges]]) -> None:
        self.layers.batch = build_adapter_batch(decode, chunks, self.dtype, self.device)

    def stats(self) -> dict:
        return {"device_free_rows": self.bank.free_rows, "device_rows": self.bank.num_rows}


class LoRAKind(AdapterKind):
    name = "lora"

    def matches(self, folder: Path) -> bool:
        return (folder / SAFETENSORS_NAME).is_file()

    def read(self, folder: Path, ctx: ReadContext) -> tuple[LoRASource, LoRAWeights]:
        source, weights = read_lora(folder, ctx.base, ctx.max_rank)
        check_lora_targets(source.targets, ctx)
        return source, weights

    def on_device(self, model: nn.Module, ctx: DeviceContext) -> LoRADevice:
        return LoRADevice(model, ctx)

    @torch.no_grad()
    def fuse(self, model: nn.Module, part: LoRAWeights) -> list[SavedWeights]:
        saved = []
        for (layer, module), (a, b) in part.modules.items():
            w = base_weight(model, layer, module)  # [out, in]
            saved.append(SavedWeights(layer, module, "full", None, w.clone()))
            w.add_((part.scale(a.shape[0]) * (b @ a)).to(w.dtype))
        return saved

    def negated(self, part: LoRAWeights) -> LoRAWeights:
        return replace(part, modules={k: (a, -b) for k, (a, b) in part.modules.items()})


LORA = LoRAKind()
