"""Fine-tune jobs at the gateway: create (every input checked before anything is written), list with
cursor pagination, show, cancel, events (a page, or followed as SSE) and checkpoints — per tenant, on
Redis (key names and payloads: `adapters_store.wire`). Trainers (`workers/trainer`) do the rest."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from adapters_store.auto_hyperparameters import resolve
from adapters_store.errors import AdapterNotFoundError
from adapters_store.ingest import CompressionRequest
from adapters_store.training_files import PURPOSE, TrainingFile, TrainingFileNotFoundError
from adapters_store.training_methods import validate_method
from adapters_store.wire import (
    FT_GROUP,
    JOB_UPDATE_LUA,
    TERMINAL_STATUSES,
    TRAINERS_SET,
    FineTuneJob,
    JobCheckpoint,
    JobEvent,
    TrainerInfo,
    event_id,
    fine_tuned_name,
    ft_checkpoints_key,
    ft_events_key,
    ft_job_key,
    ft_jobs_key,
    ft_queue_key,
    job_update_args,
    stream_id_of,
    trainer_key,
)
from server.auth import Tenant
from server.errors import ConflictError, InvalidRequestError, JobNotFoundError, ModelNotFoundError
from server.files_service import FilesService
from server.job_shapes import check_metadata, flat_method, hyperparameters_view, method_view
from server.protocol import (
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobError,
)
from server.sse import DONE, event
from server.tenant_adapters import StoredAdapter, TenantAdapters, qualified, visible

EVENTS_MAX_LEN = 10_000  # each job's event stream is trimmed (approximately) to this many entries
FOLLOW_BLOCK_MS = 1000
KEEPALIVE_S = 15.0
NO_TRAINER = ("No trainer is running for {model}: the job waits in the queue until one starts. Start one with "
              "`adapterd trainer --model PATH --redis-url URL` (the gateway's Redis), or run `adapterd serve` "
              "without `--trainers 0`")


def job_view(job: FineTuneJob) -> FineTuningJob:
    fields = {k: getattr(job, k) for k in FineTuningJob.model_fields if hasattr(job, k)}
    fields["error"] = JobError(**job.error) if job.error else None
    fields["method"] = method_view(job.method, job.method_type)
    fields["hyperparameters"] = hyperparameters_view(job.method)
    return FineTuningJob(**fields)


def event_view(stream_id: bytes | str, raw: bytes) -> FineTuningJobEvent:
    e = JobEvent.from_json(raw)
    return FineTuningJobEvent(id=event_id(stream_id), created_at=e.created_at, level=e.level, message=e.message,
                              type=e.type, data=e.data)


def checkpoint_view(c: JobCheckpoint, job: FineTuneJob) -> FineTuningJobCheckpoint:
    name = fine_tuned_name(job.model, job.suffix, job.id, checkpoint_step=c.step_number)
    return FineTuningJobCheckpoint(id=c.id, created_at=c.created_at, fine_tuning_job_id=c.fine_tuning_job_id,
                                   fine_tuned_model_checkpoint=name, step_number=c.step_number, metrics=c.metrics)


class JobsService:
    def __init__(self, redis: aioredis.Redis, files: FilesService, gateway_bases: Callable[[], set[str]],
                 max_list_limit: int = 100, adapters: TenantAdapters | None = None):
        self._redis = redis
        self._files = files
        self._adapters = adapters
        self._gateway_bases = gateway_bases
        self._max_limit = max_list_limit
        self._update = redis.register_script(JOB_UPDATE_LUA)

    # ---- create --------------------------------------------------------------------------------

    async def live_trainers(self) -> list[TrainerInfo]:
        """Trainers whose heartbeat has not expired (each announces its base model and current job)."""
        ids = list(await self._redis.smembers(TRAINERS_SET))
        if not ids:
            return []
        raws = await self._redis.mget([trainer_key(i.decode()) for i in ids])
        gone = [i for i, r in zip(ids, raws) if r is None]  # trainers whose heartbeat expired
        if gone:
            await self._redis.srem(TRAINERS_SET, *gone)
        return [TrainerInfo.from_json(r) for r in raws if r]

    async def known_bases(self) -> set[str]:
        return {b for b in self._gateway_bases() if b} | {t.model_id for t in await self.live_trainers()}

    async def _check_file(self, tenant: Tenant, file_id: str | None, param: str) -> TrainingFile | None:
        if file_id is None:
            return None
        found = await asyncio.to_thread(self._files.find, tenant, file_id)
        if found is None:
            raise TrainingFileNotFoundError(f"{param} {file_id!r}: no such file", param=param)
        if found.purpose != PURPOSE:
            raise InvalidRequestError(f"{param} {file_id!r} has purpose {found.purpose!r}, not {PURPOSE!r}",
                                      param=param, code="invalid_file_purpose")
        return found

    def _check_adapter(self, tenant: Tenant, ref: str) -> str:
        """medusa's `adapter` must be a stored adapter the tenant may use (the trainer reads it from the store);
        returns its full name (`TENANT/NAME[@VERSION]`), which the trainer resolves."""
        found = self._adapters.resolve(ref, tenant) if self._adapters is not None else None
        if not isinstance(found, StoredAdapter) or not visible(found.manifest, tenant):
            raise AdapterNotFoundError(f"method.adapter: no stored adapter {ref!r}", param="method")
        return qualified(ref, tenant)

    async def create(self, tenant: Tenant, body: FineTuningJobCreate) -> FineTuningJob:
        bases = await self.known_bases()
        if body.model not in bases:
            known = ", ".join(sorted(bases)) or "none yet: no worker or trainer has registered"
            raise ModelNotFoundError(f"the base model {body.model!r} is unknown (known: {known})", param="model")
        if body.integrations:
            raise InvalidRequestError(
                "integrations are not supported: adapterd reports a job's metrics as its events (GET "
                "/v1/fine_tuning/jobs/{id}/events) and as a CSV result file (result_files); nothing is sent to "
                "third-party services", param="integrations", code="unsupported_integrations")
        try:
            metadata = check_metadata(body.metadata)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="metadata", code="invalid_metadata") from e
        try:
            flat, requested = flat_method(body.method, body.hyperparameters)
            method = validate_method(flat)
        except ValueError as e:
            param = "hyperparameters" if body.hyperparameters is not None else "method"
            raise InvalidRequestError(str(e), param=param, code="invalid_method") from e
        compression = None
        if body.compression is not None:
            c = CompressionRequest.from_dict(body.compression)
            compression = {"method": c.method, "density": c.density, "alpha": c.alpha}
        training = await self._check_file(tenant, body.training_file, "training_file")
        await self._check_file(tenant, body.validation_file, "validation_file")
        method = resolve(method, training.records)  # "auto" → the rule's values for this file
        if method.get("adapter"):
            method["adapter"] = await asyncio.to_thread(self._check_adapter, tenant, method["adapter"])
        job = FineTuneJob(
            id=f"ftjob-{secrets.token_hex(12)}", model=body.model, organization_id=tenant.name,
            training_file=body.training_file, validation_file=body.validation_file, method=method,
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31), suffix=body.suffix,
            compression=compression, created_at=int(time.time()), method_type=requested, metadata=metadata)
        await self._write_new(job)
        return job_view(await self._load(job.id))

    async def _write_new(self, job: FineTuneJob) -> None:
        queue = ft_queue_key(job.model)
        try:
            await self._redis.xgroup_create(queue, FT_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        files = job.training_file + (f" and validation file {job.validation_file}" if job.validation_file else "")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ft_job_key(job.id), mapping=job.to_hash())
            pipe.zadd(ft_jobs_key(job.organization_id), {job.id: time.time() * 1000})
            self._add_event(pipe, job.id, JobEvent(f"Validating training file: {files}"))
            await pipe.execute()
        # the files were checked line by line on upload and just now for ownership: straight to the queue
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(ft_job_key(job.id), mapping={"status": '"queued"'})
            self._add_event(pipe, job.id, JobEvent(f"Files validated; job queued for {job.model}"))
            pipe.xadd(queue, {"job_id": job.id})
            await pipe.execute()
        if not any(t.model_id == job.model for t in await self.live_trainers()):
            await self._redis.xadd(ft_events_key(job.id), {"event": JobEvent(NO_TRAINER.format(model=job.model),
                                                                             level="warn").to_json()},
                                   maxlen=EVENTS_MAX_LEN, approximate=True)

    @staticmethod
    def _add_event(pipe, job_id: str, e: JobEvent) -> None:
        pipe.xadd(ft_events_key(job_id), {"event": e.to_json()}, maxlen=EVENTS_MAX_LEN, approximate=True)

    # ---- read ----------------------------------------------------------------------------------

    async def _load(self, job_id: str) -> FineTuneJob | None:
        return FineTuneJob.from_hash(await self._redis.hgetall(ft_job_key(job_id)))

    async def _owned(self, tenant: Tenant, job_id: str) -> FineTuneJob:
        job = await self._load(job_id) if job_id.startswith("ftjob-") and len(job_id) <= 64 else None
        if job is None or job.organization_id != tenant.name:
            raise JobNotFoundError(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
        return job

    async def get(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        return job_view(await self._owned(tenant, job_id))

    def _limit(self, limit: int) -> int:
        if not 1 <= limit <= self._max_limit:
            raise InvalidRequestError(f"limit must be in [1, {self._max_limit}]", param="limit")
        return limit

    async def list(self, tenant: Tenant, after: str | None, limit: int) -> FineTuningJobList:
        limit = self._limit(limit)
        key = ft_jobs_key(tenant.name)
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(key, after)
            if rank is None:
                raise InvalidRequestError(f"after: no fine-tuning job {after!r}", param="after")
            start = rank + 1
        ids = await self._redis.zrevrange(key, start, start + limit)
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids[:limit]:
                pipe.hgetall(ft_job_key(i.decode()))
            raws = await pipe.execute()
        jobs = [job_view(j) for j in map(FineTuneJob.from_hash, raws) if j is not None]
        return FineTuningJobList(data=jobs, has_more=len(ids) > limit)

    async def events(self, tenant: Tenant, job_id: str, after: str | None, limit: int) -> FineTuningJobEventList:
        """Newest first; `after` (an event id) pages to older events."""
        await self._owned(tenant, job_id)
        limit = self._limit(limit)
        top = "+"
        if after is not None:
            sid = stream_id_of(after)
            if sid is None:
                raise InvalidRequestError(f"after: {after!r} is not an event id", param="after")
            top = "(" + sid
        entries = await self._redis.xrevrange(ft_events_key(job_id), top, "-", count=limit + 1)
        data = [event_view(sid, fields[b"event"]) for sid, fields in entries[:limit]]
        return FineTuningJobEventList(data=data, has_more=len(entries) > limit)

    async def follow(self, tenant: Tenant, job_id: str, after: str | None) -> AsyncIterator[bytes]:
        """SSE: every event oldest first (after `after`), then new ones as they come; [DONE] once the job
        has finished and its last event was sent. Checks before the first byte (404 stays a status)."""
        await self._owned(tenant, job_id)
        last = "0-0"
        if after is not None:
            last = stream_id_of(after) or ""
            if not last:
                raise InvalidRequestError(f"after: {after!r} is not an event id", param="after")
        return self._follow(job_id, last)

    async def _follow(self, job_id: str, last: str) -> AsyncIterator[bytes]:
        key = ft_events_key(job_id)
        block: int | None = None
        quiet_since = time.monotonic()
        while True:
            status = await self._redis.hget(ft_job_key(job_id), "status")
            finished = status is not None and status.decode().strip('"') in TERMINAL_STATUSES
            got = await self._redis.xread({key: last}, count=100, block=None if finished else block)
            entries = got[0][1] if got else []
            for sid, fields in entries:
                last = sid.decode()
                yield event(event_view(sid, fields[b"event"]))
            if finished and not entries:
                yield DONE
                return
            if entries:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:  # an SSE comment keeps proxies and clients patient
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"
            block = None if entries else FOLLOW_BLOCK_MS

    async def checkpoints(self, tenant: Tenant, job_id: str, after: str | None,
                          limit: int) -> FineTuningJobCheckpointList:
        job = await self._owned(tenant, job_id)
        limit = self._limit(limit)
        raws = await self._redis.lrange(ft_checkpoints_key(job_id), 0, -1)
        found = [JobCheckpoint.from_json(r) for r in reversed(raws)]
        if after is not None:
            ids = [c.id for c in found]
            if after not in ids:
                raise InvalidRequestError(f"after: no checkpoint {after!r}", param="after")
            found = found[ids.index(after) + 1:]
        data = [checkpoint_view(c, job) for c in found[:limit]]
        return FineTuningJobCheckpointList(data=data, has_more=len(found) > limit,
                                           first_id=data[0].id if data else None,
                                           last_id=data[-1].id if data else None)

    # ---- cancel --------------------------------------------------------------------------------

    async def cancel(self, tenant: Tenant, job_id: str) -> FineTuningJob:
        """A queued job is cancelled at once; a running one is flagged and its trainer stops within a step
        or so (the job shows `cancelled` once it has)."""
        for _ in range(5):
            job = await self._owned(tenant, job_id)
            if job.status in TERMINAL_STATUSES:
                raise ConflictError(f"the job has already {job.status}", param="fine_tuning_job_id",
                                    code="job_finished")
            if job.status == "running":
                ok = await self._update(keys=[ft_job_key(job_id)], args=job_update_args(
                    {"status": ["running"]}, {"cancel_requested": True}))
                message = "Cancellation requested; the trainer stops at its next step"
            else:
                ok = await self._update(keys=[ft_job_key(job_id)], args=job_update_args(
                    {"status": [job.status]},
                    {"status": "cancelled", "cancel_requested": True, "finished_at": int(time.time())}))
                message = "Job cancelled"
            if ok:
                await self._redis.xadd(ft_events_key(job_id), {"event": JobEvent(message).to_json()},
                                       maxlen=EVENTS_MAX_LEN, approximate=True)
                return job_view(await self._owned(tenant, job_id))
        raise ConflictError("the job kept changing state; try again", param="fine_tuning_job_id")
