"""Continuous batching: which sequences run in the next step, and how much of each.

Every step carries one token for each decoding sequence, then prefill chunks of admitted prompts up to
the step's token budget (chunked prefill: a long prompt spreads over several steps instead of stalling
the running streams). Waiting requests are admitted first-come-first-served whenever a KV slot and
device rows for their adapter are free; a request whose adapter finds no room waits without blocking others.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.adapters.residency import AdapterResidency
from workers.engine.config import EngineConfig
from workers.engine.sequence import Sequence
from workers.model.kv_cache import KVCache


@dataclass(frozen=True)
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, chunk length)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache, adapters: AdapterResidency):
        self.cfg, self.kv, self.adapters = cfg, kv, adapters
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: prefilling or decoding, in admission order

    def add(self, seq: Sequence) -> None:
        """Queues a request; a request for n completions comes as one sequence with n-1 `forks`."""
        if seq.request.adapter is not None:
            for _ in range(1 + len(seq.forks)):
                self.adapters.pin(seq.request.adapter)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        self._admit()
        decode = [s for s in self.running if not s.in_prefill]
        budget = self.cfg.max_tokens_per_step - len(decode)
        prefill = []
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                length = min(len(seq.prompt) - seq.num_cached, self.cfg.prefill_chunk, budget)
                prefill.append((seq, length))
                budget -= length
        return StepPlan(decode, prefill)

    def finish(self, seq: Sequence) -> None:
        """Frees the sequence's slots (finished, or cancelled while waiting or running)."""
        adapter = seq.request.adapter
        if seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.kv_slot)
            if adapter is not None:
                self.adapters.release(adapter)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return
        if adapter is not None:
            self.adapters.unpin(adapter)
        pending, seq.forks = seq.forks, []
        for child in pending:  # completions that were never forked: their reserved slots go back
            if child.kv_slot >= 0:
                self.kv.release(child.kv_slot)
            if adapter is not None:
                self.adapters.unpin(adapter)

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Once `parent`'s prompt is cached, its other completions join the batch: each reserved slot gets
        a copy of the prompt's KV entries (one prefill for all n)."""
        children, parent.forks = parent.forks, []
        adapter = parent.request.adapter
        for child in children:
            self.kv.copy_prefix(parent.kv_slot, child.kv_slot, len(parent.prompt))
            child.num_cached = len(parent.prompt)
            child.placement = self.adapters.acquire(adapter) if adapter is not None else parent.placement
            self.running.append(child)
        return children

    def _admit(self) -> None:
        blocked: deque[Sequence] = deque()
        while self.waiting and self.kv.free_slots:
            seq = self.waiting.popleft()
            if len(seq.forks) >= self.kv.free_slots:  # n completions take n slots at once
                blocked.append(seq)
                continue
            if seq.request.adapter is not None:
                placement = self.adapters.acquire(seq.request.adapter)
                if placement is None:
                    blocked.append(seq)
                    continue
                seq.placement = placement
            else:
                seq.placement = self.adapters.placement(None)  # the base: a correction while one is fused
            seq.kv_slot = self.kv.allocate()
            for child in seq.forks:
                child.kv_slot = self.kv.allocate()
            self.running.append(seq)
        self.waiting.extendleft(reversed(blocked))
