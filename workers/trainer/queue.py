"""The trainer's side of the fine-tune job queue and records on Redis (key names and payloads:
`adapters_store.wire`).

At-least-once delivery on a Redis Stream with a consumer group: a trainer claims a new entry with
XREADGROUP, keeps its claim fresh from a heartbeat thread (`XCLAIM … JUSTID`, only while it still owns
it), and XACKs + XDELs the entry when the job has ended. An entry whose owner went silent longer than the
claim timeout is taken over with XAUTOCLAIM, which also counts the delivery: the count bounds the attempts.
Job records change only through compare-and-set (`JOB_UPDATE_LUA`), guarded by the attempt number, so a
trainer that lost its claim can never overwrite what the new owner wrote."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from adapters_store.wire import (
    FT_GROUP,
    JOB_UPDATE_LUA,
    KEEP_CLAIM_LUA,
    TRAINERS_SET,
    FineTuneJob,
    JobCheckpoint,
    JobEvent,
    TrainerInfo,
    ft_checkpoints_key,
    ft_events_key,
    ft_job_key,
    ft_queue_key,
    job_update_args,
    trainer_key,
)

EVENTS_MAX_LEN = 10_000


@dataclass(frozen=True)
class Claim:
    entry_id: str
    job_id: str | None  # None: a malformed or deleted entry (acked and skipped)
    deliveries: int  # how many times the entry was delivered, this one included
    taken_over: bool  # claimed from a trainer that went silent


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class JobQueue:
    """One base model's queue, as seen by one consumer (trainer)."""

    def __init__(self, client: redis.Redis, model_id: str, consumer: str, claim_timeout_s: float):
        self.redis = client
        self.key = ft_queue_key(model_id)
        self.consumer = consumer
        self.claim_timeout_ms = max(1, int(claim_timeout_s * 1000))
        self._keep = client.register_script(KEEP_CLAIM_LUA)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.key, FT_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def claim(self, block_s: float) -> Claim | None:
        """A stale claim taken over, else a new entry (waiting up to block_s), else None."""
        try:
            return self._take_over() or self._next(block_s)
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_group()
            return None

    def _take_over(self) -> Claim | None:
        reply = self.redis.xautoclaim(self.key, FT_GROUP, self.consumer, self.claim_timeout_ms, "0-0", count=1)
        claimed = reply[1] if len(reply) > 1 else []
        if not claimed:
            return None
        entry_id, fields = claimed[0]
        entry_id = _text(entry_id)
        pending = self.redis.xpending_range(self.key, FT_GROUP, min=entry_id, max=entry_id, count=1)
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        return Claim(entry_id, _text((fields or {}).get(b"job_id")), deliveries, taken_over=True)

    def _next(self, block_s: float) -> Claim | None:
        got = self.redis.xreadgroup(FT_GROUP, self.consumer, {self.key: ">"}, count=1,
                                    block=max(1, int(block_s * 1000)))
        if not got or not got[0][1]:
            return None
        entry_id, fields = got[0][1][0]
        return Claim(_text(entry_id), _text((fields or {}).get(b"job_id")), 1, taken_over=False)

    def keep(self, claim: Claim) -> bool:
        """Refreshes the claim; False once another trainer has taken it over (or it was acked)."""
        return bool(self._keep(keys=[self.key], args=[FT_GROUP, self.consumer, claim.entry_id]))

    def release(self, claim: Claim) -> None:
        """Makes the claim look stale at once, so another trainer takes the job over without waiting."""
        self.redis.xclaim(self.key, FT_GROUP, self.consumer, 0, [claim.entry_id], idle=self.claim_timeout_ms + 1,
                          justid=True)

    def finish(self, claim: Claim) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.key, FT_GROUP, claim.entry_id)
            pipe.xdel(self.key, claim.entry_id)
            pipe.execute()

    def pending(self) -> int:
        return int(self.redis.xpending(self.key, FT_GROUP)["pending"])


class JobRecords:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._update = client.register_script(JOB_UPDATE_LUA)

    def load(self, job_id: str) -> FineTuneJob | None:
        return FineTuneJob.from_hash(self.redis.hgetall(ft_job_key(job_id)))

    def update(self, job_id: str, expect: dict[str, list], fields: dict) -> bool:
        """Sets `fields` if every expected field holds one of its allowed values (atomically)."""
        return bool(self._update(keys=[ft_job_key(job_id)], args=job_update_args(expect, fields)))

    def event(self, job_id: str, event: JobEvent) -> None:
        self.redis.xadd(ft_events_key(job_id), {"event": event.to_json()}, maxlen=EVENTS_MAX_LEN, approximate=True)

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(ft_job_key(job_id), "cancel_requested") == b"true"

    def add_checkpoint(self, checkpoint: JobCheckpoint) -> None:
        self.redis.rpush(ft_checkpoints_key(checkpoint.fine_tuning_job_id), checkpoint.to_json())

    def checkpoints(self, job_id: str) -> list[JobCheckpoint]:
        return [JobCheckpoint.from_json(r) for r in self.redis.lrange(ft_checkpoints_key(job_id), 0, -1)]


def announce(client: redis.Redis, info: TrainerInfo, ttl_s: float) -> None:
    info.heartbeat_at = time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(trainer_key(info.trainer_id), info.to_json(), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(TRAINERS_SET, info.trainer_id)
        pipe.execute()


def withdraw(client: redis.Redis, trainer_id: str) -> None:
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(trainer_key(trainer_id))
        pipe.srem(TRAINERS_SET, trainer_id)
        pipe.execute()
