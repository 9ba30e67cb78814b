"""The registry of adapter kinds the store accepts (the torch-free half of the kind contract,
`adapters_store.adapter_kind.StoreKind`). An upload says what it is by its files (each kind has its own
config or weights file); a `kind` given with it must agree. Adding a kind: one `StoreKind` in its format
module and one `register` line here."""

from __future__ import annotations

from adapters_store import medusa_validation, s2ft_format, validation
from adapters_store.adapter_kind import Files, StoreKind
from adapters_store.base_model import BaseModelSpec
from adapters_store.errors import InvalidAdapterError
from adapters_store.validation import UploadLimits, ValidatedAdapter

_REGISTERED: list[StoreKind] = []  # tried in registration order
FALLBACK = validation.STORE_KIND  # files that say they are no other kind are checked as a LoRA


def register(kind: StoreKind) -> StoreKind:
    _REGISTERED.append(kind)
    return kind


def by_name(name: str) -> StoreKind:
    """The kind a manifest or request names (any of its names: "compeft" is the LoRA kind)."""
    found = next((kind for kind in (FALLBACK, *_REGISTERED) if name in kind.names), None)
    if found is None:
        raise InvalidAdapterError(f"kind {name!r} is not one of {', '.join(kind_names())}", param="kind")
    return found


def are_heads(name: str) -> bool:
    """Is a kind of this name speculative heads (attached to an adapter or the base, never a model)?"""
    return any(name in kind.names and kind.heads for kind in (FALLBACK, *_REGISTERED))


def kind_names() -> tuple[str, ...]:
    return tuple(name for kind in (FALLBACK, *_REGISTERED) for name in kind.names)


def detect(files: Files) -> StoreKind:
    return next((kind for kind in _REGISTERED if kind.matches(files)), FALLBACK)


def validate_upload(files: Files, base: BaseModelSpec, limits: UploadLimits,
                    kind: str | None = None) -> ValidatedAdapter:
    names = kind_names()
    if kind is not None and kind not in names:
        raise InvalidAdapterError(f"kind {kind!r} is not one of {', '.join(names)}", param="kind")
    found = detect(files)
    if kind is not None and kind not in found.names:
        raise InvalidAdapterError(f"kind {kind!r} but the files are a {found.name} adapter", param="kind")
    return found.validate(files, base, limits, kind)


register(s2ft_format.STORE_KIND)
register(medusa_validation.STORE_KIND)
