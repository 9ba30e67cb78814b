"""Operations: /health (alive), /ready (Redis reachable and at least one worker; "degraded" when
`adapterd serve` gave up restarting a process), /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.dependencies import Metrics, Registry, Settings
from server.errors import NoWorkerError
from server.supervisor import read_status

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(registry: Registry, settings: Settings) -> dict:
    workers = registry.alive()
    if not registry.redis_ok:
        raise NoWorkerError("Redis is not reachable", retry_after_s=1, code="redis_unreachable")
    if not workers:
        raise NoWorkerError("no worker is registered", retry_after_s=1)
    given_up = read_status(settings.data_dir).get("given_up") or {}
    return {"status": "degraded" if given_up else "ready", "workers": len(workers),
            "model": registry.base_model_id, **({"given_up": given_up} if given_up else {})}


@router.get("/metrics")
async def metrics(metrics: Metrics, registry: Registry) -> Response:
    metrics.workers_alive.set(len(registry.alive()))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
