"""Builds the gateway app: services wired from settings at start-up, routes, the one error boundary."""

from __future__ import annotations

from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.types import ASGIApp

from adapters_store.body_limit import BodyLimit
from server.allowed_folders import AllowList
from server.auth import ApiKeyAuth
from server.dispatch import Dispatcher
from server.dropin_adapters import DropInAdapters
from server.errors import error_response, install_error_boundary
from server.files_service import FILES_PATH, build_files_service
from server.jobs_service import JobsService
from server.metrics import GatewayMetrics
from server.native_service import NativeService
from server.openai_service import ChatService, CompletionService
from server.request_context import RequestContext
from server.router import WorkerRouter
from server.routes import adapters, console, files, jobs, native, openai, ops, vllm
from server.settings import GatewaySettings
from server.tenant_adapters import ADAPTER_UPLOAD_PATH, build_tenant_adapters
from server.vllm_service import VllmService
from server.worker_client import WorkerClient
from server.worker_registry import WorkerRegistry

UPLOAD_PATHS = (ADAPTER_UPLOAD_PATH, FILES_PATH)


class BodySizeLimit(BodyLimit):
    """Refuses bodies over the limit with 413, by declared length before anything reads them and by the
    bytes counted as they arrive (chunked bodies too): `upload_max_bytes` for adapter and training-file
    uploads, `max_bytes` for everything else."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int | None = None):
        upload = upload_max_bytes or max_bytes
        super().__init__(app, lambda scope: upload if scope["path"] in UPLOAD_PATHS else max_bytes, _too_large)


def _too_large(limit: int) -> ASGIApp:
    return error_response(413, "invalid_request_error", f"request body over {limit} bytes", code="payload_too_large")


def _wire(app: FastAPI, settings: GatewaySettings) -> None:
    state = app.state
    state.redis = aioredis.from_url(settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    signer = settings.cluster_signer()
    state.registry = WorkerRegistry(state.redis, settings.registry_refresh_s, settings.worker_down_s, signer,
                                    settings.worker_record_max_age_s)
    state.router = WorkerRouter(
        state.registry, settings.queue_max, settings.queue_timeout_s, settings.retry_after_s
    )
    state.worker_client = WorkerClient(
        settings.worker_connect_timeout_s,
        settings.worker_read_timeout_s,
        settings.max_connections,
        signer,
    )
    allow = AllowList(settings.adapter_allow_list())
    state.catalog = DropInAdapters(allow)
    state.adapters = build_tenant_adapters(settings, state.catalog, lambda: state.registry.base_model)
    state.dispatcher = Dispatcher(
        state.adapters,
        state.registry,
        state.router,
        state.worker_client,
        state.metrics,
        settings.retry_after_s,
        settings.model_id,
    )
    state.completions = CompletionService(state.dispatcher)
    state.chat = ChatService(state.dispatcher, settings.default_max_tokens)
    state.native = NativeService(state.dispatcher)
    state.vllm = VllmService(state.dispatcher, state.registry, state.worker_client, state.adapters,
                             allow, settings.max_upload_bytes, settings.retry_after_s)
    state.files = build_files_service(settings)
    state.jobs = JobsService(state.redis, state.files, lambda: {state.dispatcher.base_model_id, settings.model_id},
                             settings.max_job_list_limit, state.adapters)


def create_app(settings: GatewaySettings) -> FastAPI:
    settings.check_bind_safety()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        _wire(app, settings)
        await app.state.registry.start()
        try:
            yield
        finally:
            await app.state.registry.stop()
            await app.state.worker_client.aclose()
            await app.state.redis.aclose()

    app = FastAPI(title="adapterd", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.auth = ApiKeyAuth(settings.tenants_by_key(), settings.admin_key_list())
    app.state.metrics = GatewayMetrics()
    app.include_router(openai.router)
    app.include_router(native.router)
    app.include_router(ops.router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(vllm.router)
    console.install(app)
    install_error_boundary(app)
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_request_bytes, upload_max_bytes=settings.max_upload_bytes
    )
    app.add_middleware(RequestContext, metrics=app.state.metrics)  # outermost: sees every response
    return app
