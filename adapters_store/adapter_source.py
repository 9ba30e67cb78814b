"""Where a worker takes an adapter's files from, as the gateway names it on the wire (`adapter_path`,
`AdapterLoadRequest.path`, `medusa_path`, merge members): never a filesystem path or a URL, only one of

    store:NAME@VERSION      a pinned version in the worker's own configured store
    dropin:NAME[/VERSION]   a folder in the operator's drop-in directory (`DATA_DIR/adapters/`), the one
                            local-folder allow-list; NAME and VERSION are single safe path components

The worker resolves a source against its own configuration (store URL, drop-in directory), so no request
can point it at another store, another endpoint or another folder. Torch-free."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from adapters_store.registry import parse_ref

_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")  # as the drop-in catalog's names
STORE, DROPIN = "store", "dropin"


class InvalidSourceError(ValueError):
    pass


@dataclass(frozen=True)
class SourceRef:
    kind: Literal["store", "dropin"]
    name: str  # store: `NAME@VERSION`; dropin: `NAME` or `NAME/VERSION`

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def parts(self) -> tuple[str, ...]:
        """A drop-in source's path components below the drop-in directory."""
        return tuple(self.name.split("/"))


def store_source(ref: str) -> str:
    return str(SourceRef(STORE, ref))


def dropin_source(name: str, version: str | None) -> str:
    return str(SourceRef(DROPIN, f"{name}/{version}" if version else name))


def parse_source(text: str) -> SourceRef:
    """Raises InvalidSourceError (its message does not repeat the text) for anything else."""
    kind, _, name = text.partition(":")
    if kind == STORE:
        parsed = parse_ref(name)
        if parsed is not None and parsed[1] is not None:
            return SourceRef(STORE, name)
    elif kind == DROPIN:
        parts = name.split("/")
        if 1 <= len(parts) <= 2 and all(_PART.match(p) for p in parts):
            return SourceRef(DROPIN, name)
    raise InvalidSourceError("an adapter source is 'store:NAME@VERSION' or 'dropin:NAME[/VERSION]'; "
                             "workers take no paths or URLs")
