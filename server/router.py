"""Picks the worker for a request: one that holds the adapter and has a free slot, else the least
loaded one with a free slot (which then loads the adapter). When every live worker is full the request
waits in a bounded queue; with no live worker, or a full queue, or after the queue timeout: 503."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable

from server.errors import NoWorkerError
from server.worker_registry import WorkerRegistry, WorkerView


class Lease:
    """One request's claim on a worker slot; `release()` exactly once (idempotent)."""

    def __init__(self, router: WorkerRouter, worker: WorkerView):
        self._router = router
        self.worker = worker
        self._released = False
        worker.in_flight += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.worker.in_flight -= 1
        self._router.slot_freed()


class WorkerRouter:
    def __init__(self, registry: WorkerRegistry, queue_max: int, queue_timeout_s: float, retry_after_s: int):
        self._registry = registry
        self._queue_max = queue_max
        self._queue_timeout_s = queue_timeout_s
        self._retry_after_s = retry_after_s
        self._freed = asyncio.Event()
        self.waiting = 0

    def slot_freed(self) -> None:
        self._freed.set()

    def pick(self, adapter: str | None, exclude: Iterable[str] = ()) -> WorkerView | None:
        """The best worker with a free slot, None if all are full; NoWorkerError if none is alive."""
        excluded = set(exclude)
        live = [w for w in self._registry.alive() if w.worker_id not in excluded]
        if not live:
            raise NoWorkerError("no worker is available", retry_after_s=self._retry_after_s)
        free = [w for w in live if w.in_flight < w.capacity]
        if not free:
            return None
        if adapter is not None:
            holders = [w for w in free if w.holds(adapter)]
            free = holders or free
        low = min(w.load() for w in free)
        return random.choice([w for w in free if w.load() == low])

    async def acquire(self, adapter: str | None, exclude: Iterable[str] = ()) -> Lease:
        worker = self.pick(adapter, exclude)
        if worker is not None:
            return self._lease(worker, adapter)
        if self.waiting >= self._queue_max:
            raise NoWorkerError(
                "all workers are busy and the queue is full",
                retry_after_s=self._retry_after_s,
                code="overloaded",
            )
        deadline = time.monotonic() + self._queue_timeout_s
        self.waiting += 1
        try:
            while worker is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoWorkerError(
                        "timed out waiting for a free worker",
                        retry_after_s=self._retry_after_s,
                        code="overloaded",
                    )
                await self._wait_for_change(min(left, 0.25))
                worker = self.pick(adapter, exclude)
        finally:
            self.waiting -= 1
        return self._lease(worker, adapter)

    def _lease(self, worker: WorkerView, adapter: str | None) -> Lease:
        if adapter is not None:
            worker.assume(adapter)
        return Lease(self, worker)

    async def _wait_for_change(self, timeout: float) -> None:
        freed = self._freed
        try:
            await asyncio.wait_for(freed.wait(), timeout)
        except TimeoutError:
            return
        if freed is self._freed:
            self._freed = asyncio.Event()
