"""The S²FT kind (`workers.adapters.s2ft`): its device is the id-keyed `S2FTDeviceStore` with `S2FTLinear`
wrappers (outermost, over the LoRA ones) reading the per-step `S2FTBatch`; fusing writes the selected
columns (`W[:, idx] += C`) or rows (`W[idx, :] += C`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.adapters.kind import AdapterKind, DeviceContext, ReadContext, SavedWeights, base_weight
from workers.adapters.s2ft import MODULES, S2FTSource, S2FTUpdate, S2FTWeights, is_s2ft_folder, read_s2ft
from workers.adapters.s2ft_ops import AdapterIds, S2FTContext, S2FTDeviceStore, attach_s2ft_layers, build_s2ft_batch


class S2FTDevice:
    def __init__(self, model: nn.Module, ctx: DeviceContext):
        self.device, self.max_adapters = ctx.device, ctx.max_adapters
        self.store = S2FTDeviceStore(ctx.base.num_layers, ctx.dtype, ctx.device)
        self.layers = S2FTContext(ctx.kernel)
        attach_s2ft_layers(model, self.store, self.layers)

    def check(self, source) -> None:
        pass  # any checked S²FT adapter fits once the others are evicted

    def fits(self, part: S2FTWeights) -> bool:
        return len(self.store.resident) < self.max_adapters

    def place(self, part: S2FTWeights) -> int:
        return self.store.add(part)

    def free(self, adapter_id: int) -> None:
        self.store.remove(adapter_id)

    def set_batch(self, decode: list[AdapterIds], chunks: list[tuple[int, int, AdapterIds]]) -> None:
        self.layers.batch = build_s2ft_batch(decode, chunks, self.device)

    def stats(self) -> dict:
        return {"device_s2ft_bytes": self.store.nbytes}


class S2FTKind(AdapterKind):
    name = "s2ft"

    def matches(self, folder: Path) -> bool:
        return is_s2ft_folder(folder)

    def read(self, folder: Path, ctx: ReadContext) -> tuple[S2FTSource, S2FTWeights]:
        return read_s2ft(folder, ctx.base)

    def on_device(self, model: nn.Module, ctx: DeviceContext) -> S2FTDevice:
        return S2FTDevice(model, ctx)

    @torch.no_grad()
    def fuse(self, model: nn.Module, part: S2FTWeights) -> list[SavedWeights]:
        saved = []
        for (layer, module), update in part.modules.items():
            assert MODULES[module][1] == update.kind
            w = base_weight(model, layer, module)
            idx = update.index.to(w.device)
            if update.kind == "col":
                saved.append(SavedWeights(layer, module, "col", idx, w[:, idx].clone()))
                w[:, idx] += update.delta.to(w.dtype)  # [out, k]
            else:
                saved.append(SavedWeights(layer, module, "row", idx, w[idx, :].clone()))
                w[idx, :] += update.delta.to(w.dtype)  # [k, in]
        return saved

    def negated(self, part: S2FTWeights) -> S2FTWeights:
        return S2FTWeights({k: S2FTUpdate(u.kind, u.index, -u.delta) for k, u in part.modules.items()})


S2FT = S2FTKind()
