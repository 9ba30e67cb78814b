"""Native TGI/LoRAX-style routes: /generate, /generate_stream, `POST /` (TGI's client endpoint) and /info."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant, Tenant
from server.dependencies import Adapters, DispatcherDep, Native, Vllm
from server.protocol import ErrorResponse, GenerateRequest, GenerateResponse
from server.sse import OR_STREAM, EventStreamResponse
from server.tenant_adapters import TenantAdapters
from server.version import VERSION

router = APIRouter(responses={"default": {"model": ErrorResponse}})


async def _admit(body: GenerateRequest, adapters: TenantAdapters, tenant: Tenant):
    """A local path (`adapter_source: "local"`) becomes the drop-in's name; then the registry's checks."""
    p = body.parameters
    p.adapter_id = await asyncio.to_thread(adapters.local_name, p.adapter_id, p.adapter_source)
    return await asyncio.to_thread(adapters.admit, p.adapter_id, p.merged_adapters, tenant)


@router.post("/generate", response_model=GenerateResponse, responses=OR_STREAM)
async def generate(body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant):
    merged = await _admit(body, adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged, tenant), media_type="text/event-stream")
    return await service.generate(body, merged, tenant)


@router.post("/generate_stream", response_class=EventStreamResponse, responses=OR_STREAM)
async def generate_stream(
    body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant
) -> EventStreamResponse:
    merged = await _admit(body, adapters, tenant)
    return EventStreamResponse(await service.stream(body, merged, tenant))


@router.post("/", response_model=list[GenerateResponse], responses=OR_STREAM)
async def compat(body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant):
    """TGI's and LoRAX's client endpoint: `stream` picks SSE, else a one-element list."""
    merged = await _admit(body, adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged, tenant), media_type="text/event-stream")
    return [await service.generate(body, merged, tenant)]


@router.get("/info")
async def info(dispatcher: DispatcherDep, vllm: Vllm) -> dict:
    """TGI/LoRAX's /info: what a client reads of the served model and the request limits."""
    max_len = vllm.max_model_len()
    return {"model_id": dispatcher.base_model_id, "model_dtype": None, "model_device_type": None,
            "max_best_of": 1, "max_stop_sequences": 16, "max_input_length": max_len,
            "max_total_tokens": max_len, "version": VERSION, "sha": None, "docker_label": None}
