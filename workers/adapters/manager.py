"""Adapter residency: adapters registered on the host, and the device slots that running rows use.

A request holds its adapter's slot from admission to finish (refcounted). A slot whose adapter no row
uses is reused least-recently-used first when another adapter needs one.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from workers.adapters.lora import LoRAWeights, load_lora
from workers.adapters.slots import LoRASlotBank
from workers.errors import AdapterNotFoundError, AdapterValidationError
from workers.model.config import DecoderConfig


class AdapterManager:
    def __init__(self, base: DecoderConfig, bank: LoRASlotBank):
        self.base, self.bank = base, bank
        self.host: dict[str, LoRAWeights] = {}
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # resident in a device slot, LRU order
        self.refs: dict[str, int] = {}
        self.free_slots = list(range(bank.max_loras, 0, -1))  # pop() → lowest slot first

    def load(self, name: str, folder: str | Path) -> LoRAWeights:
        """Parse and validate; replaces an adapter of the same name that no running row uses."""
        weights = load_lora(folder, self.base, self.bank.max_rank)
        missing = weights.targets - set(self.bank.targets)
        if missing:
            raise AdapterValidationError(f"target modules {sorted(missing)} are not enabled on this worker")
        self.register(name, weights)
        return weights

    def register(self, name: str, weights: LoRAWeights) -> None:
        if self.refs.get(name):
            raise AdapterValidationError(f"adapter {name!r} is in use and cannot be replaced now")
        self._drop_slot(name)
        self.host[name] = weights

    def unload(self, name: str) -> None:
        if name not in self.host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if self.refs.get(name):
            raise AdapterValidationError(f"adapter {name!r} is in use and cannot be unloaded now")
        self._drop_slot(name)
        del self.host[name]

    def require(self, name: str) -> None:
        if name not in self.host:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded on this worker")

    def acquire(self, name: str) -> int | None:
        """A device slot holding `name` for one more row, or None when every slot is busy."""
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_a_slot()
            if slot is None:
                return None
            self.bank.write(slot, self.host[name])
            self.slot_of[name] = slot
        self.slot_of.move_to_end(name)
        self.refs[name] = self.refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if not self.refs[name]:
            del self.refs[name]

    def resident(self) -> list[str]:
        return sorted(self.host)

    def _free_a_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        for name in self.slot_of:  # least recently used first
            if not self.refs.get(name):
                return self.slot_of.pop(name)
        return None

    def _drop_slot(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self.bank.clear(slot)
            self.free_slots.append(slot)
            self.free_slots.sort(reverse=True)
