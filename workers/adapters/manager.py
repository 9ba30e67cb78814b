"""Adapter residency, two tiers: the host cache (adapters as stored — compressed bytes stay compressed —
in a byte-budgeted LRU) and the device (decoded weights: LoRA in the rank-budgeted row bank, S²FT in its
device store).

A request pins its adapter in the host cache from arrival to finish, and holds its device copy from
admission to finish. Unpinned host entries and unused device copies are evicted least-recently-used first
when room is needed. Decoding for the device can be staged ahead, off the decode loop (`stage`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from workers.adapters.combined import AdapterWeights, split_parts
from workers.adapters.lora import LoRAWeights
from workers.adapters.ops import RowRanges
from workers.adapters.s2ft import S2FTWeights
from workers.adapters.s2ft_ops import AdapterIds, S2FTDeviceStore
from workers.adapters.slots import LoRARowBank
from workers.errors import AdapterBusyError, AdapterNotFoundError, AdapterValidationError, CapacityError
from workers.model.config import DecoderConfig

MAX_STAGED = 4  # decoded adapters waiting for admission (each is a full fp32 copy)


class AdapterSource(Protocol):
    """One adapter in the host cache, in its stored form. `kind` says what it decodes to:
    "lora" (LoRA and ComPEFT sources: LoRAWeights), "s2ft" (S2FTWeights) or "combined" (CombinedWeights)."""

    kind: str
    targets: frozenset[str]

    @property
    def nbytes(self) -> int: ...

    def decode(self, base: DecoderConfig) -> AdapterWeights: ...


@dataclass(frozen=True)
class DevicePlacement:
    """What a running row adds to the base on the device: its adapter's LoRA row range or S²FT id, and,
    while another adapter is fused into the base, that adapter's negated copy (the correction)."""

    lora_rows: RowRanges = ()
    s2ft_ids: AdapterIds = ()

    def plus(self, other: DevicePlacement) -> DevicePlacement:
        return DevicePlacement(self.lora_rows + other.lora_rows, self.s2ft_ids + other.s2ft_ids)


BASE_PLACEMENT = DevicePlacement()


class AdapterManager:
    def __init__(self, base: DecoderConfig, bank: LoRARowBank, s2ft: S2FTDeviceStore, max_s2ft: int,
                 host_budget_bytes: int, on_evict: Callable[[str], None] = lambda name: None):
        self.base, self.bank, self.s2ft, self.max_s2ft = base, bank, s2ft, max_s2ft
        self.host_budget_bytes = host_budget_bytes
        self.on_evict = on_evict
        self.host: OrderedDict[str, AdapterSource] = OrderedDict()  # LRU order
        self.device: OrderedDict[str, DevicePlacement] = OrderedDict()  # LRU order; device ⊆ host
        self.pins: Counter[str] = Counter()  # requests in the engine (waiting or running)
        self.refs: Counter[str] = Counter()  # running rows using the device copy
        self.staged: OrderedDict[str, AdapterWeights] = OrderedDict()  # decoded ahead of admission
        self.counters: Counter[str] = Counter()
        self.fused: str | None = None  # the adapter merged into the base weights (see `fusion`)
        self.correction = BASE_PLACEMENT  # its negated copy, which every other row adds
        self.before_drop: Callable[[str], None] = lambda name: None  # the fusion controller unfuses here

    # host tier -------------------------------------------------------------------------------
    def register(self, name: str, source: AdapterSource) -> None:
        """Adds or replaces an adapter; evicts unpinned LRU entries to stay within the byte budget."""
        rank = getattr(source, "rank", 0)
        if rank > self.bank.num_rows:
            raise AdapterValidationError(f"rank {rank} exceeds this worker's {self.bank.num_rows} LoRA rows")
        self._unfuse_if_fused(name)
        if self.pins[name]:
            raise AdapterBusyError(f"adapter {name!r} is in use and cannot be replaced now")
        self._make_host_room(source.nbytes, keep=name)
        self._drop(name)
        self.host[name] = source
        self.counters["host_loads"] += 1

    def unload(self, name: str) -> None:
        if name not in self.host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        self._unfuse_if_fused(name)
        if self.pins[name]:
            raise AdapterBusyError(f"adapter {name!r} is in use and cannot be unloaded now")
        self._drop(name)

    def _unfuse_if_fused(self, name: str) -> None:
        """The fused adapter is pinned while fused; replacing or unloading it unfuses it first (the engine
        calls this between steps only)."""
        if name == self.fused:
            self.before_drop(name)

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

    def stage(self, name: str, weights: AdapterWeights) -> None:
        """Keeps decoded weights until admission (dropped then, when the last request unpins, or when
        more than MAX_STAGED are waiting)."""
        if name in self.host and name not in self.device:
            self.staged[name] = weights
            while len(self.staged) > MAX_STAGED:
                self.staged.popitem(last=False)

    def acquire(self, name: str) -> DevicePlacement | None:
        """The device copy of `name` for one more running row, or None while no room can be freed."""
        placement = self.device.get(name)
        if placement is None:
            self.counters["device_misses"] += 1
            placement = self._load_to_device(name)
            if placement is None:
                return None
            self.device[name] = placement
        else:
            self.counters["device_hits"] += 1
        self.device.move_to_end(name)
        self.refs[name] += 1
        return self.placement(name)

    def placement(self, name: str | None) -> DevicePlacement:
        """What a row of `name` (None: the base model) adds to the base weights as they are now: nothing
        for the fused adapter's rows; the fused adapter's correction on top of its own for every other row."""
        own = BASE_PLACEMENT if name is None else self.device[name]
        if self.fused is None:
            return own
        return BASE_PLACEMENT if name == self.fused else own.plus(self.correction)

    def set_fused(self, name: str | None, correction: DevicePlacement = BASE_PLACEMENT) -> None:
        """Records which adapter the base weights hold now and where its correction sits."""
        self.fused, self.correction = name, correction

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]

    def stats(self) -> dict:
        return {**self.counters, "host_adapters": len(self.host), "host_bytes": self.host_bytes,
                "host_budget_bytes": self.host_budget_bytes, "device_adapters": len(self.device),
                "device_free_rows": self.bank.free_rows, "device_rows": self.bank.num_rows,
                "device_s2ft_bytes": self.s2ft.nbytes, "device_names": sorted(self.device)}

    def _load_to_device(self, name: str) -> DevicePlacement | None:
        source = self.host[name]
        lora_rank = source.rank if source.kind in ("lora", "combined") else 0
        if source.kind in ("s2ft", "combined") and not self._evict_until(
                lambda: len(self.s2ft.resident) < self.max_s2ft, kind="s2ft"):
            return None
        if lora_rank and not self._evict_until(lambda: self.bank.can_allocate(lora_rank), kind="lora"):
            return None
        started = time.perf_counter()
        lora, s2ft = split_parts(self.staged.pop(name, None) or source.decode(self.base))
        placement = BASE_PLACEMENT
        if s2ft is not None:
            placement = placement.plus(DevicePlacement(s2ft_ids=(self.s2ft.add(s2ft),)))
        if lora is not None:
            rows = self.bank.allocate(lora_rank)
            self.bank.write(rows, lora)
            placement = placement.plus(DevicePlacement(lora_rows=(rows,)))
        self.counters["device_load_us"] += int((time.perf_counter() - started) * 1e6)
        return placement

    def place_correction(self, weights: LoRAWeights | S2FTWeights) -> DevicePlacement | None:
        """Puts weights that belong to no adapter name on the device (a fused adapter's correction),
        evicting unused device copies for room; None when there is none. Free it with `free_placement`."""
        if isinstance(weights, S2FTWeights):
            if not self._evict_until(lambda: len(self.s2ft.resident) < self.max_s2ft, kind="s2ft"):
                return None
            return DevicePlacement(s2ft_ids=(self.s2ft.add(weights),))
        if not self._evict_until(lambda: self.bank.can_allocate(weights.rank), kind="lora"):
            return None
        rows = self.bank.allocate(weights.rank)
        self.bank.write(rows, weights)
        return DevicePlacement(lora_rows=(rows,))

    def free_placement(self, placement: DevicePlacement) -> None:
        for adapter_id in placement.s2ft_ids:
            self.s2ft.remove(adapter_id)
        for rows in placement.lora_rows:
            self.bank.release(rows)

    # eviction --------------------------------------------------------------------------------
    def _evict_until(self, fits: Callable[[], bool], kind: str) -> bool:
        """Evicts unused device copies holding `kind` ("lora" rows or "s2ft" ids), least recently used
        first, until `fits()`."""
        holds = (lambda p: p.lora_rows) if kind == "lora" else (lambda p: p.s2ft_ids)
        for victim in [n for n, p in self.device.items() if not self.refs[n] and holds(p)]:
            if fits():
                return True
            self._release_device(victim)
            self.counters["device_evictions"] += 1
        return fits()

    def _release_device(self, name: str) -> None:
        placement = self.device.pop(name, None)
        if placement is not None:
            self.free_placement(placement)

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
        self.before_drop(name)
        self._release_device(name)
        self.staged.pop(name, None)
        self.host.pop(name, None)
