"""Native TGI/LoRAX-style routes: /generate, /generate_stream, `POST /` (TGI's client endpoint) and /info."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.dependencies import Adapters, DispatcherDep, Native, Vllm
from server.protocol import ErrorResponse, GenerateRequest, GenerateResponse
from server.version import VERSION

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


@router.post("/", response_model=list[GenerateResponse])
async def compat(body: GenerateRequest, service: Native, adapters: Adapters, tenant: CurrentTenant):
    """TGI's and LoRAX's client endpoint: `stream` picks SSE, else a one-element list."""
    adapters.authorize(body.parameters.adapter_id, tenant)
    merged = adapters.resolve_merge(body.parameters.merged_adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged), media_type="text/event-stream")
    return [await service.generate(body, merged)]


@router.get("/info")
async def info(dispatcher: DispatcherDep, vllm: Vllm) -> dict:
    """TGI/LoRAX's /info: what a client reads of the served model and the request limits."""
    max_len = vllm.max_model_len()
    return {"model_id": dispatcher.base_model_id, "model_dtype": None, "model_device_type": None,
            "max_best_of": 1, "max_stop_sequences": 16, "max_input_length": max_len,
            "max_total_tokens": max_len, "version": VERSION, "sha": None, "docker_label": None}
