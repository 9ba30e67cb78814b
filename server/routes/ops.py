"""Operations: /health (alive), /ready (Redis reachable and at least one worker; reports the workers and the
trainers alive), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.dependencies import Metrics, Registry
from server.errors import NoWorkerError

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(registry: Registry, request: Request) -> dict:
    workers = registry.alive()
    if not registry.redis_ok:
        raise NoWorkerError("Redis is not reachable", retry_after_s=1, code="redis_unreachable")
    if not workers:
        raise NoWorkerError("no worker is registered", retry_after_s=1)
    trainers = await request.app.state.jobs.live_trainers()
    return {"status": "ready", "workers": len(workers), "model": registry.base_model_id,
            "trainers": len(trainers),
            "trainer_list": [{"id": t.trainer_id, "model": t.model_id, "job": t.job_id} for t in trainers]}


@router.get("/metrics")
async def metrics(metrics: Metrics, registry: Registry) -> Response:
    metrics.workers_alive.set(len(registry.alive()))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
