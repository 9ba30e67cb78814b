"""The worker half of the adapter-kind contract. Every kind (LoRA, ComPEFT-compressed LoRA, S²FT, Medusa heads, combined
LoRA + S²FT merges, a test's toy kind) is one `AdapterKind` in its own module, registered once in
`workers.adapters.kinds`; the engine, the adapter manager, fusion and the model runner iterate the
registered kinds and never test for one. (The torch-free half, the format check the store shares, is
`adapters_store.adapter_kind.StoreKind`.)

A kind's life on the worker:
- `matches(folder)` / `read(folder, ctx)`: host load — a folder → what the host cache keeps (a `HostAdapter`,
  stored bytes) and its decoded weights, every check passed;
- the decoded weights are one or more parts (`weights.parts`), each naming (`part.kind`) the kind whose
  device holds it: a combined merge decodes into a LoRA part and an S²FT part, a ComPEFT LoRA into a LoRA;
- `on_device(model, ctx)`: device placement — a kind whose parts live on the device makes a `KindDevice`,
  which wraps the model's layers with its own, places and frees parts, and sets the per-step batch view
  its layers read (`set_batch`); kinds whose weights are other kinds' parts return None;
- `fuse(model, part)` / `negated(part)`: fusing a part into the base weights (what was overwritten comes
  back as `SavedWeights`) and the part with its sign flipped (the correction other rows add while fused).
A kind whose weights attach to an owner instead of standing alone (Medusa heads: to an adapter, or to the
base) names the subfolder it takes in an adapter's folder (`attaches_as`); it is never read as an adapter.
Merging adapters is torch-free and lives in the store (`adapters_store.merge`), by kind of member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from workers.model.config import DecoderConfig

Handle = Any  # what a kind's device returns for one placed part (LoRA: a row range; S²FT: an id)

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class ReadContext:
    """What a kind checks a folder against."""

    base: DecoderConfig
    max_rank: int
    lora_targets: tuple[str, ...]  # the modules this worker's LoRA layers wrap


@dataclass(frozen=True)
class DeviceContext:
    """What a kind's device is built from."""

    base: DecoderConfig
    dtype: torch.dtype
    device: torch.device
    max_adapters: int  # adapters of one kind resident at once (LoRA: times max_rank rows)
    max_rank: int
    lora_targets: tuple[str, ...]
    kernel: str  # "auto" | "fast" | "grouped" | "reference"
    medusa_depth: int = 0  # the tree's depth: Medusa heads needed


class WeightsPart(Protocol):
    kind: str  # the registered kind whose device holds this part

    @property
    def nbytes(self) -> int: ...


class DecodedAdapter(Protocol):
    """One adapter's decoded weights, any kind."""

    @property
    def parts(self) -> Sequence[WeightsPart]: ...

    @property
    def nbytes(self) -> int: ...


class HostAdapter(Protocol):
    """One adapter in the host cache, in its stored form."""

    kind: str
    targets: frozenset[str]
    fusable: bool  # may it be fused into the base weights (a per-request merge is short-lived: no)

    @property
    def nbytes(self) -> int: ...

    def decode(self, base: DecoderConfig) -> DecodedAdapter: ...


class KindDevice(Protocol):
    """One kind's parts on the device, and the batch view its layers read each step."""

    def check(self, source: HostAdapter) -> None:
        """Raises AdapterValidationError when an adapter could never be placed here (too large)."""

    def fits(self, part: WeightsPart) -> bool: ...

    def place(self, part: WeightsPart) -> Handle: ...

    def free(self, handle: Handle) -> None: ...

    def set_batch(self, decode: list[tuple[Handle, ...]], chunks: list[tuple[int, int, tuple[Handle, ...]]]) -> None:
        """decode: the handles each decode token adds; chunks: (token start, end, handles) per prefill chunk,
        following the decode tokens. () = nothing of this kind."""

    def stats(self) -> dict: ...


@dataclass(frozen=True)
class SavedWeights:
    """What fusing overwrote in one base weight: all of it, or the selected columns or rows."""

    layer: int
    module: str
    kind: str  # "full" | "col" | "row"
    index: torch.Tensor | None  # [k] for col / row
    values: torch.Tensor


class AdapterKind:
    """The contract; a kind overrides what it has (see the module doc)."""

    name: str = ""
    attaches_as: str = ""  # the subfolder of an adapter's folder it attaches from ("": a standalone kind)

    def matches(self, folder: Path) -> bool:
        raise NotImplementedError

    def read(self, folder: Path, ctx: ReadContext) -> tuple[HostAdapter, DecodedAdapter]:
        raise NotImplementedError

    def on_device(self, model: nn.Module, ctx: DeviceContext) -> KindDevice | None:
        return None

    def fuse(self, model: nn.Module, part: WeightsPart) -> list[SavedWeights]:
        raise NotImplementedError(f"{self.name} adapters cannot be fused")

    def negated(self, part: WeightsPart) -> WeightsPart:
        raise NotImplementedError(f"{self.name} adapters cannot be fused")


def base_weight(model: nn.Module, layer: int, module: str) -> torch.Tensor:
    """The base linear's weight [out, in] under any adapter wrappers (each keeps the wrapped one as `.base`)."""
    linear = getattr(getattr(model.model.layers[layer], _PARENT[module]), module)
    while hasattr(linear, "base"):
        linear = linear.base
    return linear.weight


@torch.no_grad()
def restore(model: nn.Module, saved: list[SavedWeights]) -> None:
    """Copies back what fusing overwrote, last fused first."""
    for s in reversed(saved):
        w = base_weight(model, s.layer, s.module)
        if s.kind == "full":
            w.copy_(s.values)
        elif s.kind == "col":
            w[:, s.index] = s.values
        else:
            w[s.index, :] = s.values
