"""Makes a named adapter resident on the engine on demand, one load per name at a time (concurrent
requests for the same cold adapter share one load). Eviction is the engine's: its host cache is
byte-budgeted and least-recently-used, and never evicts an adapter that requests in flight use.
`on_change` hears of every load, unload and eviction (the heartbeat republishes placement).

The gateway sends either a folder path or a store reference (`file:///store#name@3`, `s3://…#name@3`);
a store reference is first materialised into a local folder under the cache dir, as stored (ComPEFT
stays compressed)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_store import errors as store_errors
from adapters_store.materialise import is_store_ref, materialise
from workers.errors import AdapterNotFoundError, AdapterValidationError

DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / f"adapterd-adapters-{os.getuid()}"


class AdapterLoader:
    def __init__(self, engine: Any, on_change: Callable[[], None] = lambda: None,
                 cache_dir: Path = DEFAULT_CACHE_DIR):
        self._engine = engine
        self._cache_dir = cache_dir
        self._on_change = on_change
        self._locks: dict[str, asyncio.Lock] = {}
        engine.on_adapter_evicted(lambda name: on_change())

    def resident(self) -> list[str]:
        return list(self._engine.resident_adapters())

    async def ensure(self, name: str, path: str | None) -> None:
        if name in self.resident():
            return
        if not path:
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="adapter")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.resident():
                return
            await self._engine.load_adapter(name, await self._folder(path))
        self._on_change()

    async def _folder(self, path: str) -> str:
        if not is_store_ref(path):
            return path
        try:
            return str(await asyncio.to_thread(materialise, path, self._cache_dir))
        except store_errors.AdapterNotFoundError as exc:
            raise AdapterNotFoundError(exc.message, param="adapter") from exc
        except store_errors.StoreError as exc:
            raise AdapterValidationError(f"cannot read the adapter from the store: {exc.message}") from exc

    def unload(self, name: str) -> None:
        """Raises AdapterNotFoundError if not resident, AdapterBusyError (409) while requests use it."""
        if name not in self.resident():
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="name")
        self._engine.unload_adapter(name)
        self._on_change()
