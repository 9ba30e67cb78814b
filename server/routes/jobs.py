"""Fine-tune jobs, in OpenAI's shapes: create, list (cursor pagination), show, cancel, events (a page, or
followed as SSE with `?stream=true`), checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.jobs_service import JobsService
from server.protocol import (
    ErrorResponse,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobCreate,
    FineTuningJobEventList,
    FineTuningJobList,
)


async def _jobs(request: Request) -> JobsService:
    return request.app.state.jobs


Jobs = Annotated[JobsService, Depends(_jobs)]
After = Annotated[str | None, Query(description="the id to continue after (cursor)")]
Limit = Annotated[int, Query(description="page size")]
router = APIRouter(prefix="/v1/fine_tuning/jobs", responses={"default": {"model": ErrorResponse}})


@router.post("", response_model=FineTuningJob)
async def create_job(body: FineTuningJobCreate, jobs: Jobs, tenant: CurrentTenant) -> FineTuningJob:
    return await jobs.create(tenant, body)


@router.get("", response_model=FineTuningJobList)
async def list_jobs(jobs: Jobs, tenant: CurrentTenant, after: After = None, limit: Limit = 20) -> FineTuningJobList:
    return await jobs.list(tenant, after, limit)


@router.get("/{job_id}", response_model=FineTuningJob)
async def show_job(job_id: str, jobs: Jobs, tenant: CurrentTenant) -> FineTuningJob:
    return await jobs.get(tenant, job_id)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
async def cancel_job(job_id: str, jobs: Jobs, tenant: CurrentTenant) -> FineTuningJob:
    return await jobs.cancel(tenant, job_id)


@router.get("/{job_id}/events", response_model=FineTuningJobEventList,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, jobs: Jobs, tenant: CurrentTenant, after: After = None, limit: Limit = 20,
                     stream: bool = False):
    if stream:
        return StreamingResponse(await jobs.follow(tenant, job_id, after), media_type="text/event-stream")
    return await jobs.events(tenant, job_id, after, limit)


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
async def job_checkpoints(job_id: str, jobs: Jobs, tenant: CurrentTenant, after: After = None,
                          limit: Limit = 10) -> FineTuningJobCheckpointList:
    return await jobs.checkpoints(tenant, job_id, after, limit)
