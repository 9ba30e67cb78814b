"""Adapter residency, two tiers: the host cache (adapters as stored — compressed bytes stay compressed —
in a byte-budgeted LRU) and device rows (decoded weights in the rank-budgeted row bank).

A request pins its adapter in the host cache from arrival to finish, and holds device rows from
admission to finish. Unpinned host entries and unused device rows are evicted least-recently-used first
when room is needed. Decoding for the device can be staged ahead, off the decode loop (`stage`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from workers.adapters.lora import LoRAWeights
from workers.adapters.slots import LoRARowBank, RowRange
from workers.errors import AdapterNotFoundError, AdapterValidationError, CapacityError
from workers.model.config import DecoderConfig


class AdapterSource(Protocol):
    """One adapter in the host cache, in its stored form (any kind that decodes to LoRA weights)."""

    rank: int

    @property
    def nbytes(self) -> int: ...

    def decode(self, base: DecoderConfig, max_rank: int) -> LoRAWeights: ...


class AdapterManager:
    def __init__(self, base: DecoderConfig, bank: LoRARowBank, max_rank: int, host_budget_bytes: int,
                 on_evict: Callable[[str], None] = lambda name: None):
        self.base, self.bank, self.max_rank = base, bank, max_rank
        self.host_budget_bytes = host_budget_bytes
        self.on_evict = on_evict
        self.host: OrderedDict[str, AdapterSource] = OrderedDict()  # LRU order
        self.device: OrderedDict[str, RowRange] = OrderedDict()  # LRU order; device ⊆ host
        self.pins: Counter[str] = Counter()  # requests in the engine (waiting or running)
        self.refs: Counter[str] = Counter()  # running rows using the device copy
        self.staged: dict[str, LoRAWeights] = {}
        self.counters: Counter[str] = Counter()

    # host tier -------------------------------------------------------------------------------
    def register(self, name: str, source: AdapterSource) -> None:
        """Adds or replaces an adapter; evicts unpinned LRU entries to stay within the byte budget."""
        if source.rank > self.bank.num_rows:
            raise AdapterValidationError(f"rank {source.rank} exceeds this worker's {self.bank.num_rows} LoRA rows")
        if self.pins[name]:
            raise AdapterValidationError(f"adapter {name!r} is in use and cannot be replaced now")
        self._make_host_room(source.nbytes, keep=name)
        self._drop(name)
        self.host[name] = source
        self.counters["host_loads"] += 1

    def unload(self, name: str) -> None:
        if name not in self.host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if self.pins[name]:
            raise AdapterValidationError(f"adapter {name!r} is in use and cannot be unloaded now")
        self._drop(name)

    def require(self, name: str) -> None:
        if name not in self.host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded on this worker")

    def pin(self, name: str) -> None:
        self.require(name)
        self.pins[name] += 1
        self.host.move_to_end(name)

    def unpin(self, name: str) -> None:
        self.pins[name] -= 1
        if self.pins[name] <= 0:
            del self.pins[name]
            self.staged.pop(name, None)

    def resident(self) -> list[str]:
        return sorted(self.host)

    @property
    def host_bytes(self) -> int:
        return sum(s.nbytes for s in self.host.values())

    # device tier -----------------------------------------------------------------------------
    def needs_decode(self, name: str) -> AdapterSource | None:
        """The source to decode ahead of admission, or None when it is on device or staged already."""
        if name in self.device or name in self.staged:
            return None
        return self.host.get(name)

    def stage(self, name: str, weights: LoRAWeights) -> None:
        """Keeps decoded weights until admission (dropped then, or when the last request unpins)."""
        if name in self.host and name not in self.device:
            self.staged[name] = weights

    def acquire(self, name: str) -> RowRange | None:
        """Device rows holding `name` for one more running row, or None while none can be freed."""
        rows = self.device.get(name)
        if rows is None:
            self.counters["device_misses"] += 1
            source = self.host[name]
            rows = self._allocate(source.rank)
            if rows is None:
                return None
            started = time.perf_counter()
            weights = self.staged.pop(name, None) or source.decode(self.base, self.max_rank)
            self.bank.write(rows, weights)
            self.counters["device_load_us"] += int((time.perf_counter() - started) * 1e6)
            self.device[name] = rows
        else:
            self.counters["device_hits"] += 1
        self.device.move_to_end(name)
        self.refs[name] += 1
        return rows

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]

    def stats(self) -> dict:
        return {**self.counters, "host_adapters": len(self.host), "host_bytes": self.host_bytes,
                "host_budget_bytes": self.host_budget_bytes, "device_adapters": len(self.device),
                "device_free_rows": self.bank.free_rows, "device_rows": self.bank.num_rows}

    # eviction --------------------------------------------------------------------------------
    def _allocate(self, rank: int) -> RowRange | None:
        rows = self.bank.allocate(rank)
        victims = (n for n in list(self.device) if not self.refs[n])  # least recently used first
        while rows is None:
            victim = next(victims, None)
            if victim is None:
                return None
            self.bank.release(self.device.pop(victim))
            self.counters["device_evictions"] += 1
            rows = self.bank.allocate(rank)
        return rows

    def _make_host_room(self, nbytes: int, keep: str) -> None:
        if nbytes > self.host_budget_bytes:
            raise CapacityError(f"the adapter ({nbytes} bytes) exceeds the host cache ({self.host_budget_bytes} bytes)")
        used = self.host_bytes - (self.host[keep].nbytes if keep in self.host else 0)
        for victim in [n for n in self.host if n != keep and not self.pins[n]]:
            if used + nbytes <= self.host_budget_bytes:
                return
            used -= self.host[victim].nbytes
            self._drop(victim)
            self.counters["host_evictions"] += 1
            self.on_evict(victim)
        if used + nbytes > self.host_budget_bytes:
            raise CapacityError("the host adapter cache is full of adapters in use")

    def _drop(self, name: str) -> None:
        rows = self.device.pop(name, None)
        if rows is not None:
            self.bank.release(rows)
        self.staged.pop(name, None)
        self.host.pop(name, None)
