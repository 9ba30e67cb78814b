"""Where a worker takes an adapter's files from, as the gateway names it on the wire (`adapter_path`,
`AdapterLoadRequest.path`, `medusa_path`, merge members): never a filesystem path or a URL, only

    store:NAME@VERSION      a pinned version in the worker's own configured store

The worker resolves a source against its own configured store, so no request can point it at another store,
another endpoint or a folder. Local folders reach workers only after the gateway has imported them into the
store from the operator's allow-list (`server.allowed_folders`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from adapters_store.version_store import parse_ref

STORE = "store"


class InvalidSourceError(ValueError):
    pass


@dataclass(frozen=True)
class SourceRef:
    name: str  # `NAME@VERSION`

    def __str__(self) -> str:
        return f"{STORE}:{self.name}"


def store_source(ref: str) -> str:
    return str(SourceRef(ref))


def parse_source(text: str) -> SourceRef:
    """Raises InvalidSourceError (its message does not repeat the text) for anything else."""
    kind, _, name = text.partition(":")
    parsed = parse_ref(name) if kind == STORE else None
    if parsed is None or parsed[1] is None:
        raise InvalidSourceError("an adapter source is 'store:NAME@VERSION'; workers take no paths or URLs")
    return SourceRef(name)
