"""Unfused S²FT serving: per-token structured-sparse deltas for a batch whose rows use different adapters.

Device storage (`S2FTDeviceStore`): per (layer, module), a table of the resident adapters' updates keyed
by a small integer id (0 = no S²FT adapter); each update keeps its row/column index and Cᵀ.
Per-step metadata (`S2FTBatch`, built once per step by `build_s2ft_batch`): which adapter ids each token
uses — one for its adapter, and a second while another adapter is fused into the base (its negated copy,
the correction). Both kernels have one signature — for every token t with an adapter holding an update of this
(layer, module):

- column update (o_proj, down_proj): `y[t] += C · x[t, idx]`, i.e. `y += x[..., idx] @ Cᵀ`
- row update (v_proj, up_proj): `y[t, idx] += C · x[t]`, i.e. `y[..., idx] += x @ Cᵀ`

`s2ft_add_reference` loops over tokens: the oracle. `s2ft_add_fast`: decode rows grouped by adapter, one
gathered GEMM per adapter present in the step; prefill chunks (one adapter each): one GEMM per chunk.
`S2FTLinear` wraps any linear (the base's or a `LoRALinear`) and adds these deltas to what it returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from workers.adapters.s2ft import MODULES, S2FTWeights

NO_S2FT = 0  # adapter id of tokens without an S²FT adapter
AdapterIds = tuple[int, ...]  # the S²FT adapter ids one token adds; () = none


@dataclass(frozen=True)
class DeviceUpdate:
    """One resident adapter's update of one (layer, module), in the model's dtype and device."""

    kind: str  # "col" | "row"
    index: torch.Tensor  # [k] long: columns (col) or rows (row) of the base weight
    ct: torch.Tensor  # Cᵀ — col: [k, out]; row: [in, k]


Updates = Mapping[int, DeviceUpdate]  # adapter id → its update of one (layer, module)


class S2FTDeviceStore:
    """Resident S²FT adapters on the device, by id. `table(layer, module)` is a live dict that the
    wrapping layer keeps: adding or removing an adapter is seen by the layer at its next step."""

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device,
                 modules: tuple[str, ...] = tuple(MODULES)):
        self.modules, self.dtype, self.device = modules, dtype, device
        self.tables: dict[tuple[int, str], dict[int, DeviceUpdate]] = {
            (layer, m): {} for layer in range(num_layers) for m in modules}
        self.resident: dict[int, int] = {}  # adapter id → device bytes

    def table(self, layer: int, module: str) -> dict[int, DeviceUpdate]:
        return self.tables[(layer, module)]

    def add(self, weights: S2FTWeights) -> int:
        """Copies one adapter to the device; returns its id (the smallest free one ≥ 1)."""
        missing = weights.targets - set(self.modules)
        assert not missing, f"the store does not wrap {sorted(missing)}"
        adapter_id = next(i for i in range(1, len(self.resident) + 2) if i not in self.resident)
        nbytes = 0
        for key, update in weights.modules.items():
            index = update.index.to(self.device)  # [k]
            ct = update.delta.T.to(device=self.device, dtype=self.dtype).contiguous()  # col: [k, out]; row: [in, k]
            self.tables[key][adapter_id] = DeviceUpdate(update.kind, index, ct)
            nbytes += index.nbytes + ct.nbytes
        self.resident[adapter_id] = nbytes
        return adapter_id

    def remove(self, adapter_id: int) -> None:
        del self.resident[adapter_id]
        for table in self.tables.values():
            table.pop(adapter_id, None)

    @property
    def nbytes(self) -> int:
        return sum(self.resident.values())


@dataclass(frozen=True)
class S2FTBatch:
    """Which S²FT adapter each token of the step uses, prepared once per step for every layer."""

    token_ids: tuple[AdapterIds, ...]  # per token
    num_decode: int  # tokens [0, num_decode) are decode rows
    decode_groups: tuple[tuple[int, torch.Tensor], ...]  # (adapter id, its decode tokens [g] long)
    segments: tuple[tuple[int, int, int], ...]  # (token start, token end, adapter id) per prefill chunk

    @property
    def active(self) -> bool:
        return bool(self.decode_groups or self.segments)


def build_s2ft_batch(decode_ids: list[AdapterIds], chunk_ids: list[tuple[int, int, AdapterIds]],
                     device: torch.device) -> S2FTBatch:
    """decode_ids: adapter ids of each decode token; chunk_ids: (token start, end, adapter ids) per prefill
    chunk, the chunks following the decode tokens in order."""
    token_ids = list(decode_ids)
    for start, end, ids in chunk_ids:
        token_ids.extend([ids] * (end - start))
    groups: dict[int, list[int]] = {}
    for token, ids in enumerate(decode_ids):
        for adapter_id in ids:
            if adapter_id != NO_S2FT:
                groups.setdefault(adapter_id, []).append(token)
    return S2FTBatch(
        token_ids=tuple(token_ids),
        num_decode=len(decode_ids),
        decode_groups=tuple((a, torch.tensor(t, dtype=torch.long, device=device)) for a, t in groups.items()),
        segments=tuple((s, e, a) for s, e, ids in chunk_ids for a in ids if a != NO_S2FT and e > s),
    )


def s2ft_add_reference(y: torch.Tensor, x: torch.Tensor, updates: Updates, batch: S2FTBatch) -> None:
    """y: [N, out] += per token; x: [N, in]."""
    for token, ids in enumerate(batch.token_ids):
        for adapter_id in ids:
            u = updates.get(adapter_id)
            if u is None:
                continue
            c = u.ct.T  # col: [out, k]; row: [k, in]
            if u.kind == "col":
                y[token] += c @ x[token, u.index]
            else:
                y[token, u.index] += c @ x[token]


def s2ft_add_fast(y: torch.Tensor, x: torch.Tensor, updates: Updates, batch: S2FTBatch) -> None:
    for adapter_id, tokens in batch.decode_groups:
        u = updates.get(adapter_id)
        if u is not None:
            _add_gathered(y, x, u, tokens)
    for start, end, adapter_id in batch.segments:
        u = updates.get(adapter_id)
        if u is not None:
            _add_chunk(y[start:end], x[start:end], u)


def _add_gathered(y: torch.Tensor, x: torch.Tensor, u: DeviceUpdate, tokens: torch.Tensor) -> None:
    """One adapter's scattered decode tokens [g]: gather, one GEMM, scatter-add."""
    if u.kind == "col":
        y.index_add_(0, tokens, x[tokens[:, None], u.index] @ u.ct)  # [g, k] @ [k, out]
    else:
        y.index_put_((tokens[:, None], u.index), x[tokens] @ u.ct, accumulate=True)  # [g, in] @ [in, k]


def _add_chunk(y: torch.Tensor, x: torch.Tensor, u: DeviceUpdate) -> None:
    """One prefill chunk (views y: [T, out], x: [T, in]), all of one adapter."""
    if u.kind == "col":
        y.addmm_(x[:, u.index], u.ct)  # [T, k] @ [k, out]
    else:
        y.index_add_(1, u.index, x @ u.ct)  # [T, in] @ [in, k]


S2FTKernel = Callable[[torch.Tensor, torch.Tensor, Updates, S2FTBatch], None]


class S2FTContext:
    """Per-step S²FT metadata shared by every wrapped layer."""

    def __init__(self, kernel: str = "fast"):
        """kernel: the engine's adapter kernel name; S²FT has one fast kernel, which every name but "reference"
        (the oracle) runs."""
        self.batch: S2FTBatch | None = None
        self.kernel: S2FTKernel = s2ft_add_reference if kernel == "reference" else s2ft_add_fast


class S2FTLinear(nn.Module):
    """Adds the per-token S²FT deltas to what the wrapped linear (base or LoRA-wrapped) returns."""

    def __init__(self, base: nn.Module, updates: dict[int, DeviceUpdate], ctx: S2FTContext):
        super().__init__()
        self.base = base
        self.__dict__["direct"] = base  # base outside the module registry, called as direct.forward(x): no module
        # call (~3 µs: hook checks) per linear per step
        self.updates = updates  # the store's live table for this (layer, module)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.direct.forward(x)  # [N, out]
        batch = self.ctx.batch
        if batch is not None and batch.active and self.updates:
            self.ctx.kernel(y, x, self.updates, batch)
        return y


def attach_s2ft_layers(model: nn.Module, store: S2FTDeviceStore, ctx: S2FTContext) -> None:
    """Wraps each of the store's modules in every decoder layer (outermost, over any LoRA wrapper)."""
    for index, layer in enumerate(model.model.layers):
        for module in store.modules:
            parent = getattr(layer, MODULES[module][0])
            inner = getattr(parent, module)
            if not isinstance(inner, S2FTLinear):
                setattr(parent, module, S2FTLinear(inner, store.table(index, module), ctx))
