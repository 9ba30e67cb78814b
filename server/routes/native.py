"""Native TGI/LoRAX-style routes: /generate and /generate_stream."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.dependencies import Adapters, Native
from server.protocol import ErrorResponse, GenerateRequest, GenerateResponse
from server.sse import OR_STREAM, EventStreamResponse

router = APIRouter(responses={"default": {"model": ErrorResponse}})


@router.post("/generate", response_model=GenerateResponse, responses=OR_STREAM)
async def generate(body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant):
    merged = await asyncio.to_thread(adapters.admit, body.parameters.adapter_id, body.parameters.merged_adapters,
                                     tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged, tenant), media_type="text/event-stream")
    return await service.generate(body, merged, tenant)


@router.post("/generate_stream", response_class=EventStreamResponse, responses=OR_STREAM)
async def generate_stream(
    body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant
) -> EventStreamResponse:
    merged = await asyncio.to_thread(adapters.admit, body.parameters.adapter_id, body.parameters.merged_adapters,
                                     tenant)
    return EventStreamResponse(await service.stream(body, merged, tenant))
