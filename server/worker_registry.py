"""The gateway's view of the live workers: a snapshot re-read from Redis every `refresh_s`, plus what
only this gateway knows (its own in-flight count per worker, adapters it just sent to a worker, workers
it saw fail). Routing reads the snapshot, so the request path never waits on Redis. Only records signed
with the cluster secret count: anything else written there (by a process that got into Redis) is ignored, and
so is a signed record whose signed heartbeat time is older than its TTL (an old record written back)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from adapters_store.base_model import BaseModelConfigError, BaseModelSpec
from adapters_store.cluster_auth import ClusterSigner
from adapters_store.wire import WORKERS_SET, WorkerInfo, worker_key

log = logging.getLogger("adapterd.gateway.registry")
ASSUME_LOADED_S = 10.0


@dataclass
class WorkerView:
    info: WorkerInfo
    in_flight: int = 0  # requests this gateway has running on it
    assumed: dict[str, float] = field(default_factory=dict)  # adapter we sent it → when (monotonic)
    down_until: float = 0.0

    def holds(self, adapter: str) -> bool:
        """Resident per its heartbeat, or sent to it by us so recently that no heartbeat shows it yet."""
        if adapter in self.info.resident_adapters:
            return True
        sent = self.assumed.get(adapter)
        return sent is not None and time.monotonic() - sent < ASSUME_LOADED_S

    def assume(self, adapter: str) -> None:
        if adapter not in self.info.resident_adapters:
            self.assumed[adapter] = time.monotonic()

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def capacity(self) -> int:
        return max(1, self.info.capacity)

    def load(self) -> int:
        return max(self.in_flight, self.info.in_flight)


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, refresh_s: float, down_s: float, signer: ClusterSigner,
                 max_record_age_s: float = 60.0):
        self._redis = redis
        self._signer = signer
        self._max_record_age_s = max_record_age_s  # caps the TTL a record names
        self._refused: set[str] = set()  # worker ids whose unsigned records were already logged
        self._refresh_s = refresh_s
        self._down_s = down_s
        self._workers: dict[str, WorkerView] = {}
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.redis_ok = False
        self.base_model_id: str | None = None
        self.base_model: BaseModelSpec | None = None  # as the workers publish it (uploads are checked on it)
        self.changed = asyncio.Event()  # set after each refresh (router waiters re-check)

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self.refresh()
        self._task = asyncio.create_task(self._run(), name="worker-registry")

    async def stop(self) -> None:
        self._stopping = True  # also ends the loop if the Redis client swallows the cancellation
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def alive(self) -> list[WorkerView]:
        now = time.monotonic()
        return [w for w in self._workers.values() if w.down_until <= now]

    def get(self, worker_id: str) -> WorkerView | None:
        return self._workers.get(worker_id)

    def mark_down(self, worker_id: str) -> None:
        view = self._workers.get(worker_id)
        if view is not None:
            view.down_until = time.monotonic() + self._down_s

    async def refresh(self) -> None:
        try:
            ids = sorted(
                m.decode() if isinstance(m, bytes) else m for m in await self._redis.smembers(WORKERS_SET)
            )
            raws = await self._redis.mget([worker_key(i) for i in ids]) if ids else []
        except Exception:
            self.redis_ok = False
            raise
        self.redis_ok = True
        fresh: dict[str, WorkerView] = {}
        gone = []
        for worker_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                gone.append(worker_id)
                continue
            info = self._verified(worker_id, raw)
            if info is not None:
                fresh[worker_id] = self._merge(info)
        if gone:
            await self._redis.srem(WORKERS_SET, *gone)
        self._workers = fresh
        if fresh:
            self.base_model_id = next(iter(fresh.values())).info.model_id
            self.base_model = self._published_base(fresh.values()) or self.base_model
        self.changed.set()
        self.changed = asyncio.Event()

    def _verified(self, worker_id: str, raw: bytes) -> WorkerInfo | None:
        try:
            info = WorkerInfo.from_json(raw)
            valid = info.worker_id == worker_id and info.verified_by(self._signer)
        except (ValueError, TypeError):
            info, valid = None, False
        why = "not signed with this cluster's secret"
        if valid and info.fresh_at(time.time(), self._max_record_age_s):
            self._refused.discard(worker_id)
            return info
        if valid:
            why = "its signed heartbeat time is stale (a replayed record?)"
        if worker_id not in self._refused:
            self._refused.add(worker_id)
            log.warning("ignoring worker record %r: %s", worker_id[:64], why)
        return None

    def _published_base(self, views) -> BaseModelSpec | None:
        for view in views:
            if view.info.model_id == self.base_model_id and view.info.base_model:
                try:
                    return BaseModelSpec.from_config(view.info.base_model)
                except BaseModelConfigError as exc:
                    log.warning("worker %s published an unusable base model: %s", view.worker_id, exc)
        return None

    def _merge(self, info: WorkerInfo) -> WorkerView:
        """Updates the worker's view in place: leases in flight hold it, so its counts must carry over."""
        view = self._workers.get(info.worker_id)
        if view is None:
            return WorkerView(info=info)
        # a worker seen failing stays down until it heartbeats again (a killed one never does)
        if view.info.heartbeat_at != info.heartbeat_at:
            view.down_until = 0.0
        view.assumed = {a: t for a, t in view.assumed.items() if a not in info.resident_adapters}
        view.info = info
        return view

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("registry refresh failed: %s", exc)
