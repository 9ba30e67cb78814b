"""Makes a named adapter resident on the engine on demand, one load per name at a time (concurrent
requests for the same cold adapter share one load). Eviction is the engine's: its host cache is
byte-budgeted and least-recently-used, and never evicts an adapter that requests in flight use.
`on_change` hears of every load, unload and eviction (the heartbeat republishes placement).

The gateway names where the files are with a source (`adapters_store.adapter_source`), never a path or a
URL: `store:name@3` is materialised from this worker's own configured store into a local folder under the
cache dir, as stored (ComPEFT stays compressed); nothing else (the gateway imports the operator's drop-in
folders into the store). A per-request merge (`WorkerMerge`) is built from its members'
folders once, written under the cache dir by its name (a content key), and loaded like any adapter folder.
The cache dir is bounded by bytes
(`FolderCache`, LRU), and the per-name locks live only while a load holds them. Error messages name sources,
never this machine's paths."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters_store import errors as store_errors
from adapters_store.adapter_source import InvalidSourceError, parse_source
from adapters_store.materialise import materialise
from adapters_store.merge import MergeSpec, merge_files
from adapters_store.version_store import VersionStore
from adapters_store.wire import WorkerMerge
from workers.errors import AdapterdError, AdapterNotFoundError, AdapterValidationError, InvalidRequestError
from workers.service.folder_cache import DEFAULT_MAX_BYTES, FolderCache
from workers.service.keyed_locks import KeyedLocks


@dataclass(frozen=True)
class AdapterSources:
    """Where this worker may take adapter files from (its configuration, never a request's)."""

    store: VersionStore | None  # None: no store configured (store sources are refused)
    cache_dir: Path  # materialised store versions and built merges


class AdapterFetcher:
    def __init__(self, engine: Any, sources: AdapterSources, on_change: Callable[[], None] = lambda: None,
                 cache_max_bytes: int = DEFAULT_MAX_BYTES):
        self._engine = engine
        self._sources = sources
        self._cache_dir = sources.cache_dir
        self.cache = FolderCache(sources.cache_dir, cache_max_bytes)
        self._on_change = on_change
        self._locks = KeyedLocks()
        self._heads: dict[str | None, str] = {}  # owner → path of the Medusa heads attached to it
        engine.on_adapter_evicted(self._evicted)

    def _evicted(self, name: str) -> None:
        self._heads.pop(name, None)  # the engine detached its heads with it
        self._on_change()

    def resident(self) -> list[str]:
        return list(self._engine.resident_adapters())

    async def ensure(self, name: str, path: str | None, merge: WorkerMerge | None = None) -> None:
        if name in self.resident():
            return
        if not path and merge is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="adapter")
        async with self._locks.hold(name):
            if name in self.resident():
                return
            folder = await self._merged_folder(name, merge) if merge is not None else await self._folder(path)
            await self._without_paths(self._engine.load_adapter(name, folder), folder, path or name)
            self._heads.pop(name, None)  # heads attached to an earlier adapter of that name left with it
            await asyncio.to_thread(self.cache.used, folder)
        self._on_change()

    async def _merged_folder(self, name: str, merge: WorkerMerge) -> str:
        members = [(await self._folder(m.path), m.weight) for m in merge.members]
        spec = MergeSpec(tuple(str(i) for i in range(len(members))), tuple(w for _, w in members), merge.strategy,
                         merge.density, merge.majority_sign_method)
        out = self._cache_dir / "merges" / name.replace(":", "-").replace("/", "-")
        try:
            await asyncio.to_thread(write_merged_folder, members, spec, self._engine.base_config, out)
            await asyncio.to_thread(self.cache.used, out)  # now, so that a trim leaves it while it loads
        except store_errors.StoreError as exc:
            raise AdapterValidationError(f"cannot merge the adapters: {exc.message}") from exc
        return str(out)

    async def _folder(self, text: str) -> str:
        """The local folder of a source, materialised from the store."""
        try:
            source = parse_source(text)
        except InvalidSourceError as exc:
            raise InvalidRequestError(str(exc), param="adapter_path") from exc
        if self._sources.store is None:
            raise InvalidRequestError("this worker has no adapter store configured", param="adapter_path")
        try:
            folder = await asyncio.to_thread(materialise, self._sources.store, source.name, self._cache_dir)
            await asyncio.to_thread(self.cache.used, folder)  # now, so that a trim leaves it while it loads
            return str(folder)
        except store_errors.AdapterNotFoundError as exc:
            raise AdapterNotFoundError(exc.message, param="adapter") from exc
        except store_errors.StoreError as exc:
            raise AdapterValidationError(f"cannot read the adapter {source.name!r} from the store") from exc

    async def _without_paths(self, loading: Awaitable, folder: str, source: str) -> Any:
        """Awaits `loading`; an error's message names `source` where it named this machine's folder."""
        try:
            return await loading
        except AdapterdError as exc:
            exc.message = exc.message.replace(folder, repr(source))
            exc.args = (exc.message,)
            raise

    async def ensure_heads(self, owner: str | None, path: str) -> None:
        """Attaches the Medusa heads at `path` to `owner` (an adapter; None: the base) unless they already are:
        the gateway names the heads the registry attaches to each adapter version."""
        if self._heads.get(owner) == path:
            return
        async with self._locks.hold(f"heads {owner}"):
            if self._heads.get(owner) != path:
                await self.load_heads(owner, path)

    async def load_heads(self, owner: str | None, path: str) -> None:
        folder = await self._folder(path)
        await self._without_paths(self._engine.load_medusa(folder, owner), folder, path)
        self._heads[owner] = path

    async def unload(self, name: str) -> None:
        """Raises AdapterNotFoundError if not resident, AdapterBusyError (409) while requests use it. Off the
        event loop: the engine unloads between steps, so this may wait for the step in flight."""
        if name not in self.resident():
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="name")
        await asyncio.to_thread(self._engine.unload_adapter, name)
        self._heads.pop(name, None)
        self._on_change()


def write_merged_folder(members: list[tuple[str, float]], spec: MergeSpec, base, out: Path) -> None:
    """Merges the member folders (their regular files) and writes the result to `out`, atomically: one
    kind's folder, or `lora/` + `s2ft/` for a merge of both kinds (`workers.adapters.combined`)."""
    if out.is_dir():
        return
    files = [({p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}, w) for folder, w in members]
    parts = merge_files(files, spec, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    try:
        for part, part_files in parts.items():
            folder = tmp / part if len(parts) > 1 else tmp
            folder.mkdir(exist_ok=True)
            for filename, data in part_files.items():
                (folder / filename).write_bytes(data)
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
