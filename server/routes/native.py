"""Native TGI/LoRAX-style routes: /generate and /generate_stream."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.dependencies import Adapters, Native
from server.protocol import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter(responses={"default": {"model": ErrorResponse}})


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant):
    adapters.authorize(body.parameters.adapter_id, tenant)
    merged = adapters.resolve_merge(body.parameters.merged_adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged), media_type="text/event-stream")
    return await service.generate(body, merged)


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant
) -> StreamingResponse:
    adapters.authorize(body.parameters.adapter_id, tenant)
    merged = adapters.resolve_merge(body.parameters.merged_adapters, tenant)
    return StreamingResponse(await service.stream(body, merged), media_type="text/event-stream")
