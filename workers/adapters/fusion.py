"""Fusing a hot adapter into the base weights (dLoRA's merge/unmerge): mechanism, policy and control.

Mechanism (`WeightFusion`): each part of the adapter fused by its kind (`AdapterKind.fuse`: LoRA
`W += scale · B A` for every module it targets; S²FT `W[:, idx] += C` (columns) or `W[idx, :] += C` (rows)).
What fusing overwrites is kept and copied back on unfuse — never
subtracted, so the base is restored to the bit however many times an adapter is fused and unfused.

Correctness while fused: the fused adapter's rows add nothing (their adapter is in the weights); every
other row — base rows and other adapters' rows — also adds the fused adapter's negated copy (the
correction: LoRA with −B, S²FT with −C), placed on the device like any adapter (`AdapterResidency.placement`).

Policy (`FusionPolicy`): over the last `window` busy steps, an adapter holding at least `fuse_share` of
the running rows is fused; it is unfused when its share falls under `unfuse_share` (hysteresis), and after
any change a full window passes before the next decision. `FusionController` applies the decisions between
steps, re-places the running rows, and counts fusion events and time fused. The engine calls it only between
steps, under its step lock; the fused adapter stays pinned in the host cache while fused.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.adapters import kinds
from workers.adapters.kind import DecodedAdapter, SavedWeights, WeightsPart, restore
from workers.adapters.residency import AdapterResidency


class WeightFusion:
    def __init__(self, model: nn.Module):
        self.model = model
        self.fused: str | None = None
        self.saved: list[SavedWeights] = []

    @torch.no_grad()
    def fuse(self, name: str, weights: DecodedAdapter) -> None:
        if self.fused is not None:
            raise RuntimeError(f"adapter {self.fused!r} is fused already; unfuse it first")
        for part in weights.parts:
            self.saved += kinds.of(part).fuse(self.model, part)
        self.fused = name

    def unfuse(self) -> str | None:
        """Restores every overwritten value; returns the adapter that was fused (None if none was)."""
        restore(self.model, self.saved)
        self.saved.clear()
        name, self.fused = self.fused, None
        return name


def negated(weights: DecodedAdapter) -> list[WeightsPart]:
    """The update with its sign flipped, part by part: what rows that must not see a fused adapter add."""
    return [kinds.of(part).negated(part) for part in weights.parts]


@dataclass(frozen=True)
class FusionConfig:
    enabled: bool = True
    window: int = 32  # busy steps observed before each decision
    fuse_share: float = 0.9  # fuse an adapter holding at least this share of the running rows
    unfuse_share: float = 0.5  # unfuse the fused adapter when its share falls below this


class FusionPolicy:
    """Which adapter the base weights should hold, from the adapters of the running rows step by step."""

    def __init__(self, cfg: FusionConfig):
        self.cfg = cfg
        self.window: deque[Counter] = deque(maxlen=cfg.window)

    def decide(self, rows: Sequence[str | None], fused: str | None) -> str | None:
        """rows: the adapter of each running row this step (None: base). Returns the adapter to hold
        fused (None: none); a change resets the window."""
        if not self.cfg.enabled:  # the state changes only by hand (`FusionController.fuse` / `unfuse`)
            return fused
        if rows:
            self.window.append(Counter(rows))
        if len(self.window) < self.cfg.window:
            return fused
        totals = sum(self.window, Counter())
        share = {name: n / totals.total() for name, n in totals.items()}
        if fused is not None and share.get(fused, 0.0) >= self.cfg.unfuse_share:
            return fused
        top = max((n for n in share if n is not None), key=share.__getitem__, default=None)
        wanted = top if top is not None and share[top] >= self.cfg.fuse_share else None
        if wanted != fused:
            self.window.clear()
        return wanted


class FusionController:
    """Applies the policy between steps: fuses (weights + correction on the device) and unfuses, then
    re-places the running rows. `running()` gives the running sequences (anything with `.request.adapter`
    and a writable `.placement`)."""

    def __init__(self, model: nn.Module, adapters: AdapterResidency, cfg: FusionConfig,
                 running: Callable[[], list]):
        self.weights = WeightFusion(model)
        self.adapters, self.policy, self.running = adapters, FusionPolicy(cfg), running
        self.counters: Counter[str] = Counter()
        self.fused_since = 0.0
        adapters.before_drop = self._before_drop

    def update(self) -> None:
        running = self.running()
        fused = self.adapters.fused
        wanted = self.policy.decide([s.request.adapter for s in running], fused)
        if wanted == fused:
            return
        if fused is not None:
            self.unfuse()
        if wanted is not None:
            self.fuse(wanted)

    def fuse(self, name: str) -> bool:
        """Fuses `name` (an adapter in the host cache); False when its correction finds no device room."""
        assert self.adapters.fused is None
        if not self.adapters.host[name].fusable:
            return False
        started = time.perf_counter()
        weights = self.adapters.staged.get(name) or self.adapters.host[name].decode(self.adapters.base)
        correction = self.adapters.place_parts(negated(weights))
        if correction is None:
            self.counters["fusion_skipped_no_room"] += 1
            return False
        self.weights.fuse(name, weights)
        self.adapters.set_fused(name, correction)
        self.adapters.pin(name)  # pinned while fused: the host cache cannot drop it mid-step
        self._replace_rows()
        self.fused_since = time.perf_counter()
        self.counters["fusions"] += 1
        self.counters["fusion_us"] += int((self.fused_since - started) * 1e6)
        return True

    def unfuse(self) -> None:
        started = time.perf_counter()
        name = self.weights.unfuse()
        self.adapters.free_placement(self.adapters.correction)
        self.adapters.set_fused(None)
        if name is not None:
            self.adapters.unpin(name)
        self._replace_rows()
        self.counters["unfusions"] += 1
        self.counters["fused_us"] += int((started - self.fused_since) * 1e6)
        self.counters["fusion_us"] += int((time.perf_counter() - started) * 1e6)

    def stats(self) -> dict:
        fused_us = self.counters["fused_us"]
        if self.adapters.fused is not None:
            fused_us += int((time.perf_counter() - self.fused_since) * 1e6)
        return {"fused_adapter": self.adapters.fused, "fusions": self.counters["fusions"],
                "unfusions": self.counters["unfusions"], "fused_seconds": fused_us / 1e6,
                "fusion_seconds": self.counters["fusion_us"] / 1e6,
                "fusion_skipped_no_room": self.counters["fusion_skipped_no_room"]}

    def _replace_rows(self) -> None:
        for seq in self.running():
            seq.placement = self.adapters.placement(seq.request.adapter)

    def _before_drop(self, name: str) -> None:
        if name == self.adapters.fused:
            self.unfuse()
