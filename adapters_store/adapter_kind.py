"""The torch-free half of the adapter-kind contract: what the store (and the worker, before it decodes
anything) knows of one kind — the `kind` names an upload of it may carry, how its files say that they are
one, and the check of those files against the base. Each kind's format module defines one `StoreKind`;
`adapters_store.kinds` registers them. The worker half is `workers.adapters.kind.AdapterKind`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapters_store.mapped_files import Buffer

if TYPE_CHECKING:  # the format modules import this one
    from adapters_store.base_model import BaseModelSpec
    from adapters_store.validation import UploadLimits, ValidatedAdapter

Files = Mapping[str, Buffer]  # an adapter folder's files by name (bytes, or mapped from disk)


@dataclass(frozen=True)
class StoreKind:
    names: tuple[str, ...]  # the `kind` values an upload of this kind may give (the first: its own)
    matches: Callable[[Files], bool]  # do these files say they are this kind?
    # (files, base, limits, kind given or None) → the checked adapter; any problem → a StoreError
    validate: Callable[[Files, BaseModelSpec, UploadLimits, str | None], ValidatedAdapter]
    # stored ComPEFT-compressed files → the plain folder a user downloads; None: not compressible
    dense_files: Callable[[Files], dict[str, bytes]] | None = None
    compressed_name: str | None = None  # the kind a compressed copy is recorded as (None: its own name)
    heads: bool = False  # speculative heads: attached to an adapter version (or the base), never a model

    @property
    def name(self) -> str:
        return self.names[0]
