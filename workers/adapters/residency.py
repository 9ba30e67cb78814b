"""Adapter residency, two tiers: the host cache (adapters as stored — compressed bytes stay compressed —
in a byte-budgeted LRU) and the device (decoded weights, each part on its kind's device: LoRA in the
rank-budgeted row bank, S²FT in its device store; see `workers.adapters.kind`).

A request pins its adapter in the host cache from arrival to finish, and holds its device copy from
admission to finish. Unpinned host entries and unused device copies are evicted least-recently-used first
when room is needed. Decoding for the device can be staged ahead, off the decode loop (`stage`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from workers.adapters.kind import DecodedAdapter, Handle, HostAdapter, KindDevice, WeightsPart
from workers.errors import AdapterBusyError, AdapterNotFoundError, CapacityError
from workers.model.config import DecoderConfig

MAX_STAGED = 4  # decoded adapters waiting for admission (each is a full fp32 copy)


@dataclass(frozen=True)
class DevicePlacement:
    """What a running row adds to the base on the device: its adapter's parts (kind name, the handle its
    kind's device gave: LoRA rows, an S²FT id, ...), and, while another adapter is fused into the base,
    that adapter's negated copy (the correction)."""

    handles: tuple[tuple[str, Handle], ...] = ()

    def plus(self, other: DevicePlacement) -> DevicePlacement:
        return DevicePlacement(self.handles + other.handles)

    def of(self, kind: str) -> tuple[Handle, ...]:
        """The handles of one kind's device (() = nothing of that kind)."""
        return tuple(handle for k, handle in self.handles if k == kind)


BASE_PLACEMENT = DevicePlacement()


class AdapterResidency:
    def __init__(self, base: DecoderConfig, devices: Mapping[str, KindDevice], host_budget_bytes: int,
                 on_evict: Callable[[str], None] = lambda name: None):
        self.base, self.devices = base, devices  # kind name → its device (`kinds.attach_devices`)
        self.host_budget_bytes = host_budget_bytes
        self.on_evict = on_evict
        self.host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU order
        self.device: OrderedDict[str, DevicePlacement] = OrderedDict()  # LRU order; device ⊆ host
        self.pins: Counter[str] = Counter()  # requests in the engine (waiting or running)
        self.refs: Counter[str] = Counter()  # running rows using the device copy
        self.staged: OrderedDict[str, DecodedAdapter] = OrderedDict()  # decoded ahead of admission
        self.counters: Counter[str] = Counter()
        self.fused: str | None = None  # the adapter merged into the base weights (see `fusion`)
        self.correction = BASE_PLACEMENT  # its negated copy, which every other row adds
        self.before_drop: Callable[[str], None] = lambda name: None  # the fusion controller unfuses here
        self.after_drop: Callable[[str], None] = lambda name: None  # what is attached to a name goes with it

    # host tier -------------------------------------------------------------------------------
    def register(self, name: str, source: HostAdapter) -> None:
        """Adds or replaces an adapter; evicts unpinned LRU entries to stay within the byte budget."""
        for device in self.devices.values():
            device.check(source)
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
    def needs_decode(self, name: str) -> HostAdapter | None:
        """The source to decode ahead of admission, or None when it is on device or staged already."""
        if name in self.device or name in self.staged:
            return None
        return self.host.get(name)

    def stage(self, name: str, weights: DecodedAdapter) -> None:
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
        devices = {k: v for device in self.devices.values() for k, v in device.stats().items()}
        return {**self.counters, "host_adapters": len(self.host), "host_bytes": self.host_bytes,
                "host_budget_bytes": self.host_budget_bytes, "device_adapters": len(self.device),
                **devices, "device_names": sorted(self.device)}

    def _load_to_device(self, name: str) -> DevicePlacement | None:
        started = time.perf_counter()
        weights = self.staged.pop(name, None) or self.host[name].decode(self.base)
        placement = self.place_parts(weights.parts)
        if placement is None:
            self.stage(name, weights)  # no room yet: the next try places without decoding again
            return None
        self.counters["device_load_us"] += int((time.perf_counter() - started) * 1e6)
        return placement

    def place_parts(self, parts: Sequence[WeightsPart]) -> DevicePlacement | None:
        """Puts decoded parts on their kinds' devices, evicting unused device copies for room; None (nothing
        placed) when there is none. Also places weights that belong to no adapter name (a fused adapter's
        correction); free those with `free_placement`."""
        for part in parts:
            device = self.devices[part.kind]
            if not self._evict_until(lambda d=device, p=part: d.fits(p), kind=part.kind):
                return None
        return DevicePlacement(tuple((part.kind, self.devices[part.kind].place(part)) for part in parts))

    def free_placement(self, placement: DevicePlacement) -> None:
        for kind, handle in placement.handles:
            self.devices[kind].free(handle)

    # eviction --------------------------------------------------------------------------------
    def _evict_until(self, fits: Callable[[], bool], kind: str) -> bool:
        """Evicts unused device copies holding parts of `kind`, least recently used first, until `fits()`."""
        for victim in [n for n, p in self.device.items() if not self.refs[n] and p.of(kind)]:
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
        """An adapter leaves (unloaded, replaced or evicted): unfused, off the device, out of the host cache."""
        self.before_drop(name)
        self._release_device(name)
        self.staged.pop(name, None)
        if self.host.pop(name, None) is not None:
            self.after_drop(name)
