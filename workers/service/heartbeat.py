"""Worker → Redis heartbeat: announces address, capacity, load and resident adapters with a TTL, and
keeps the adapter → workers placement sets. Key names and payload live in adapters_store.wire;
each record is signed with the cluster secret, with its time and TTL, so the gateway routes only to cluster
members whose record is fresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import redis.asyncio as aioredis

from adapters_store.cluster_auth import ClusterSigner
from adapters_store.wire import (
    PLACEMENT_TTL_FACTOR,
    WORKERS_SET,
    WorkerInfo,
    placement_key,
    worker_key,
)

log = logging.getLogger("adapterd.worker.heartbeat")


class Heartbeat:
    def __init__(self, redis_url: str, info: Callable[[], WorkerInfo], ttl_s: float, interval_s: float,
                 signer: ClusterSigner):
        self._redis = aioredis.from_url(redis_url, socket_timeout=max(ttl_s, 1.0))
        self._info = info
        self._signer = signer
        self._ttl_ms = max(int(ttl_s * 1000), 100)
        self._interval_s = interval_s
        self._placed: set[str] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.registered = False  # the first beat went through

    def nudge(self) -> None:
        """Beat now (e.g. residency changed) instead of at the next interval. Callable from any thread
        (the engine evicts adapters from its own)."""
        if self._loop is None:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.beat()  # registered before the service reports ready
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self) -> None:
        """Deregisters and stops beating (a draining worker leaves the placement set at once). Idempotent."""
        if self._stopping:
            return
        self._stopping = True  # also ends the loop if the Redis client swallows the cancellation
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self._deregister()
        await self._redis.aclose()

    async def beat(self) -> None:
        info = replace(self._info(), heartbeat_at=time.time(), ttl_s=self._ttl_ms / 1000).signed_by(self._signer)
        resident = set(info.resident_adapters)
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(worker_key(info.worker_id), info.to_json(), px=self._ttl_ms)
        pipe.sadd(WORKERS_SET, info.worker_id)
        for name in resident:
            pipe.sadd(placement_key(name), info.worker_id)
            pipe.pexpire(placement_key(name), self._ttl_ms * PLACEMENT_TTL_FACTOR)
        for name in self._placed - resident:
            pipe.srem(placement_key(name), info.worker_id)
        await pipe.execute()
        self._placed = resident
        self.registered = True

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            self._wake.clear()
            try:
                await self.beat()
            except Exception as exc:  # Redis away: keep serving, keep trying
                log.warning("heartbeat failed: %s", exc)

    async def _deregister(self) -> None:
        info = self._info()
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(worker_key(info.worker_id))
        pipe.srem(WORKERS_SET, info.worker_id)
        for name in self._placed:
            pipe.srem(placement_key(name), info.worker_id)
        await pipe.execute()
