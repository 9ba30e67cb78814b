"""The registry of adapter kinds on the worker (the contract: `workers.adapters.kind.AdapterKind`). Adding a
kind: one module with its `AdapterKind`, and one `register` line (here, or in a test for a test's kind).

Registration order is device order: each kind's layers wrap those of the kinds registered before it
(LoRA's wrap the base linears; S²FT's wrap the LoRA ones). A folder is read by the first registered kind
that recognises it, LoRA last: a folder that says it is no other kind is read, and checked, as a LoRA.
Kinds that attach to an owner (Medusa heads) are found in an adapter folder's subfolder (`attached_in`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workers.adapters.combined import COMBINED
from workers.adapters.compeft import COMPEFT
from workers.adapters.kind import AdapterKind, DeviceContext, KindDevice, WeightsPart
from workers.adapters.lora_kind import LORA
from workers.adapters.medusa_kind import MEDUSA
from workers.adapters.s2ft_kind import S2FT

_KINDS: dict[str, AdapterKind] = {}
FALLBACK = LORA


def register(kind: AdapterKind) -> AdapterKind:
    if kind.name in _KINDS:
        raise ValueError(f"an adapter kind named {kind.name!r} is registered already")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    del _KINDS[name]


def registered() -> tuple[AdapterKind, ...]:
    return tuple(_KINDS.values())


def for_folder(folder: Path) -> AdapterKind:
    """The standalone kind that reads `folder`."""
    if not folder.is_dir():
        return FALLBACK  # its read says the folder does not exist
    return next((k for k in _KINDS.values() if k is not FALLBACK and not k.attaches_as and k.matches(folder)),
                FALLBACK)


def attaching() -> tuple[AdapterKind, ...]:
    """The kinds whose weights attach to an owner (an adapter's name, or None for the base)."""
    return tuple(k for k in _KINDS.values() if k.attaches_as)


def attached_in(folder: Path) -> list[tuple[AdapterKind, Path]]:
    """The attaching kinds an adapter folder carries, each with its subfolder."""
    return [(k, folder / k.attaches_as) for k in attaching()
            if (folder / k.attaches_as).is_dir() and k.matches(folder / k.attaches_as)]


def of(part: WeightsPart) -> AdapterKind:
    """The kind whose device holds a decoded part."""
    return _KINDS[part.kind]


def attach_devices(model: nn.Module, ctx: DeviceContext) -> dict[str, KindDevice]:
    """Each kind's device, its layers attached to `model` in registration order (kind name → device)."""
    devices = {}
    for kind in _KINDS.values():
        device = kind.on_device(model, ctx)
        if device is not None:
            devices[kind.name] = device
    return devices


register(LORA)
register(S2FT)
register(COMBINED)
register(COMPEFT)
register(MEDUSA)

