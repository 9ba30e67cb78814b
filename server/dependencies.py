"""`Annotated` dependencies that hand routes the services built at start-up (kept on `app.state`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.dispatch import Dispatcher
from server.dropin_adapters import DropInAdapters
from server.metrics import GatewayMetrics
from server.native_service import NativeService
from server.openai_service import ChatService, CompletionService
from server.settings import GatewaySettings
from server.tenant_adapters import TenantAdapters
from server.vllm_service import VllmService
from server.worker_registry import WorkerRegistry


def _state(name: str):
    async def get(request: Request):  # async: FastAPI would run a plain def in its threadpool
        return getattr(request.app.state, name)

    get.__name__ = f"get_{name}"
    return Depends(get)


Completions = Annotated[CompletionService, _state("completions")]
Chat = Annotated[ChatService, _state("chat")]
Native = Annotated[NativeService, _state("native")]
DispatcherDep = Annotated[Dispatcher, _state("dispatcher")]
Registry = Annotated[WorkerRegistry, _state("registry")]
Catalog = Annotated[DropInAdapters, _state("catalog")]
Metrics = Annotated[GatewayMetrics, _state("metrics")]
Adapters = Annotated[TenantAdapters, _state("adapters")]
Settings = Annotated[GatewaySettings, _state("settings")]
Vllm = Annotated[VllmService, _state("vllm")]
