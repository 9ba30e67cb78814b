"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.dependencies import Adapters, Chat, Completions, DispatcherDep, Vllm
from server.errors import ModelNotFoundError
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.sse import OR_STREAM

router = APIRouter(prefix="/v1", responses={"default": {"model": ErrorResponse}})
SSE = "text/event-stream"


@router.post("/completions", response_model=CompletionResponse, responses=OR_STREAM)
async def completions(body: CompletionRequest, service: Completions, adapters: Adapters, tenant: CurrentTenant):
    merged = await asyncio.to_thread(adapters.admit, body.model, body.merged_adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged, tenant), media_type=SSE)
    return await service.create(body, merged, tenant)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=OR_STREAM)
async def chat_completions(body: ChatCompletionRequest, service: Chat, adapters: Adapters, tenant: CurrentTenant):
    merged = await asyncio.to_thread(adapters.admit, body.model, body.merged_adapters, tenant)
    if body.stream:
        return StreamingResponse(await service.stream(body, merged, tenant), media_type=SSE)
    return await service.create(body, merged, tenant)


@router.get("/models", response_model=ModelList)
async def models(adapters: Adapters, dispatcher: DispatcherDep, vllm: Vllm, tenant: CurrentTenant) -> ModelList:
    base = dispatcher.base_model_id
    cards = [ModelCard(id=base, root=base)] if base else []
    cards += await asyncio.to_thread(adapters.model_cards, tenant, base)
    max_len = vllm.max_model_len()
    return ModelList(data=[c.model_copy(update={"max_model_len": max_len}) for c in cards])


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, adapters: Adapters, dispatcher: DispatcherDep, vllm: Vllm,
                tenant: CurrentTenant) -> ModelCard:
    for card in (await models(adapters, dispatcher, vllm, tenant)).data:
        if card.id == model_id:
            return card
    raise ModelNotFoundError(f"the model {model_id!r} does not exist", param="model")
