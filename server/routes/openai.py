"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from server.auth import CurrentTenant
from server.dependencies import Catalog, Chat, Completions, DispatcherDep
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", responses={"default": {"model": ErrorResponse}})
SSE = "text/event-stream"


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, service: Completions, _: CurrentTenant):
    if body.stream:
        return StreamingResponse(await service.stream(body), media_type=SSE)
    return await service.create(body)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, service: Chat, _: CurrentTenant):
    if body.stream:
        return StreamingResponse(await service.stream(body), media_type=SSE)
    return await service.create(body)


@router.get("/models", response_model=ModelList)
async def models(catalog: Catalog, dispatcher: DispatcherDep, _: CurrentTenant) -> ModelList:
    base = dispatcher.base_model_id
    cards = [ModelCard(id=base, root=base)] if base else []
    named: set[str] = set()
    for adapter in catalog.list():
        if adapter.version and adapter.name not in named:
            named.add(adapter.name)  # the bare name, meaning the latest version
            cards.append(ModelCard(id=adapter.name, root=str(adapter.name), parent=base))
        cards.append(ModelCard(id=adapter.ref, root=adapter.ref, parent=base))
    return ModelList(data=cards)
