"""Operations: /health (alive), /ready (Redis reachable and at least one worker; reports the workers and the
trainers alive; "degraded" when `adapterd serve` gave up restarting a process); for admin keys only: /metrics
and /v1/workers (each live worker's last heartbeat and this gateway's in-flight count)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.auth import AdminTenant
from server.dependencies import Metrics, Registry, Settings
from server.errors import NoWorkerError
from server.supervisor import read_status

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(registry: Registry, settings: Settings, request: Request) -> dict:
    workers = registry.alive()
    if not registry.redis_ok:
        raise NoWorkerError("Redis is not reachable", retry_after_s=1, code="redis_unreachable")
    if not workers:
        raise NoWorkerError("no worker is registered", retry_after_s=1)
    trainers = await request.app.state.jobs.live_trainers()
    given_up = read_status(settings.data_dir).get("given_up") or {}
    return {"status": "degraded" if given_up else "ready", "workers": len(workers), "model": registry.base_model_id,
            "trainers": len(trainers),
            "trainer_list": [{"id": t.trainer_id, "model": t.model_id, "job": t.job_id} for t in trainers],
            **({"given_up": given_up} if given_up else {})}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(_: AdminTenant, metrics: Metrics, registry: Registry) -> Response:
    metrics.workers_alive.set(len(registry.alive()))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/workers")
async def workers(_: AdminTenant, registry: Registry) -> dict:
    return {
        "object": "list",
        "data": [{**asdict(w.info), "gateway_in_flight": w.in_flight} for w in registry.alive()],
    }
