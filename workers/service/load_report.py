"""What a worker tells the cluster about its load on each heartbeat, beyond the registry fields (the
`stats` of `WorkerInfo`): tokens/s over a short window, running and queued requests, fusion state, Medusa
acceptance and which adapters sit on the device. Built from the engine's own stats (`Engine.stats()`);
small and JSON-safe, so the gateway can show it as it is (`GET /v1/workers`, the console)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class TokenRate:
    """Tokens emitted per second over the last `window_s` seconds (one bucket per second; bounded)."""

    def __init__(self, window_s: int = 5, clock: Callable[[], float] = time.monotonic):
        self._window_s = window_s
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, tokens]

    def add(self, tokens: int = 1) -> None:
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, tokens])
        self._trim(second)

    def per_second(self) -> float:
        self._trim(int(self._clock()))
        return sum(n for _, n in self._buckets) / self._window_s

    def _trim(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second - self._window_s:
            self._buckets.popleft()


def load_report(engine_stats: dict, tokens_per_s: float) -> dict:
    """The heartbeat's `stats` from `Engine.stats()` (missing parts read as idle / off)."""
    fusion = engine_stats.get("fusion", {})
    medusa = {
        owner or "base": {
            "steps": s.get("steps", 0),
            "mean_tokens_per_step": round(float(s.get("mean_tokens_per_step", 0.0)), 3),
            "acceptance_by_head": [round(float(a), 3) for a in s.get("acceptance_by_head", [])],
        }
        for owner, s in sorted(engine_stats.get("medusa", {}).items())
    }
    return {
        "tokens_per_s": round(tokens_per_s, 2),
        "running": int(engine_stats.get("running", 0)),
        "queue": int(engine_stats.get("waiting", 0)),
        "fusion": {
            "fused_adapter": fusion.get("fused_adapter"),
            "fusions": int(fusion.get("fusions", 0)),
            "unfusions": int(fusion.get("unfusions", 0)),
        },
        "medusa": medusa,
        "device_adapters": list(engine_stats.get("adapters", {}).get("device_names", [])),
    }
