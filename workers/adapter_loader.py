"""Makes a named adapter resident on the engine on demand: one load per name at a time, and when all
slots are taken, the least recently used adapter that no running request uses is unloaded first."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from workers.errors import AdapterdError, AdapterNotFoundError, CapacityError


class AdapterBusyError(AdapterdError):
    status = 409
    type = "conflict_error"
    code = "adapter_in_use"


class AdapterLoader:
    def __init__(self, engine: Any, max_adapters: int, on_change: Callable[[], None] = lambda: None):
        self._engine = engine
        self._max = max(1, max_adapters)
        self._on_change = on_change
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_use: Counter[str] = Counter()
        self._last_used: dict[str, float] = {}

    def resident(self) -> list[str]:
        return list(self._engine.resident_adapters())

    async def ensure(self, name: str, path: str | None) -> None:
        if name in self.resident():
            self._last_used[name] = time.monotonic()
            return
        if not path:
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="adapter")
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.resident():
                return
            self._make_room()
            await self._engine.load_adapter(name, path)
            self._last_used[name] = time.monotonic()
        self._on_change()

    def unload(self, name: str) -> None:
        if name not in self.resident():
            raise AdapterNotFoundError(f"adapter {name!r} is not resident on this worker", param="name")
        if self._in_use[name]:
            raise AdapterBusyError(f"adapter {name!r} is used by {self._in_use[name]} running request(s)")
        self._engine.unload_adapter(name)
        self._last_used.pop(name, None)
        self._on_change()

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Marks `name` as used by one running request (so it is not evicted under it)."""
        if name is None:
            yield
            return
        self._in_use[name] += 1
        try:
            yield
        finally:
            self._in_use[name] -= 1
            self._last_used[name] = time.monotonic()

    def _make_room(self) -> None:
        resident = self.resident()
        if len(resident) < self._max:
            return
        idle = [n for n in resident if not self._in_use[n]]
        if not idle:
            raise CapacityError("all adapter slots are held by running requests")
        victim = min(idle, key=lambda n: self._last_used.get(n, 0.0))
        self._engine.unload_adapter(victim)
        self._last_used.pop(victim, None)
