"""The worker's HTTP service around one engine: generate (streamed as SSE or not), health, stats and the
internal adapter load/unload used by the gateway. Registers itself in Redis through `Heartbeat`.
Errors (`workers.errors.AdapterdError`) become the JSON error shape at this module's one boundary.

Entry point: `python -m workers.service --port 9001 --redis-url redis://… --model PATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.coordination import (
    AdapterLoadRequest,
    AdapterUnloadRequest,
    ChatMessage,
    WorkerGenerateRequest,
    WorkerGenerateResult,
    WorkerInfo,
)
from workers.adapter_loader import AdapterLoader
from workers.engine.types import GenerationRequest, SamplingParams, TokenEvent
from workers.errors import AdapterdError, InvalidRequestError
from workers.heartbeat import Heartbeat
from workers.load_report import TokenRate, load_report
from workers.residency_metrics import FusionCollector, residency_registry
from workers.service_config import WorkerServiceConfig
from workers.speculative_metrics import SpeculativeCollector

log = logging.getLogger("adapterd.worker")
KEEP_ALIVE_S = 75  # idle keep-alive; above the gateway's pool keep-alive, so the gateway closes first


class PromptBuilder:
    """Text, token ids or chat messages → prompt token ids (chat through the model's template)."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer

    def build(self, req: WorkerGenerateRequest) -> tuple[int, ...]:
        given = [x is not None for x in (req.prompt, req.prompt_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_ids, messages", param="prompt")
        if req.prompt_ids is not None:
            return self._checked_ids(req.prompt_ids)
        if req.messages is not None:
            return self._chat(req.messages)
        ids = tuple(self._tok.encode(req.prompt))
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def _checked_ids(self, ids: list[int]) -> tuple[int, ...]:
        vocab = len(self._tok)
        if not ids or any(i < 0 or i >= vocab for i in ids):
            raise InvalidRequestError(
                f"prompt token ids must be non-empty and in [0, {vocab})", param="prompt"
            )
        return tuple(ids)

    def _chat(self, messages: list[ChatMessage]) -> tuple[int, ...]:
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if not getattr(self._tok, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use completions", param="messages")
        convo = [{"role": m.role, "content": m.content or ""} for m in messages]
        text = self._tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
        return tuple(self._tok.encode(text, add_special_tokens=False))


def _sampling(req: WorkerGenerateRequest) -> SamplingParams:
    p = req.params
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        stop=tuple(p.stop),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )


def _sse(ev: TokenEvent) -> bytes:
    payload = {
        "token_id": ev.token_id,
        "text": ev.text,
        "logprob": ev.logprob,
        "index": ev.index,
        "prompt_tokens": ev.prompt_tokens,
        "finish_reason": ev.finish_reason,
    }
    if ev.details is not None:
        payload["details"] = ev.details
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class WorkerService:
    """Runs generations on the engine, tracks in-flight requests, and describes the worker."""

    def __init__(self, engine: Any, config: WorkerServiceConfig):
        self.engine = engine
        self.config = config
        self.prompts = PromptBuilder(engine.tokenizer)
        self.heartbeat: Heartbeat | None = None
        self.adapters = AdapterLoader(engine, on_change=self._residency_changed)
        self.metrics = residency_registry(lambda: self.engine.stats().get("adapters", {}))
        self.metrics.register(FusionCollector(lambda: self.engine.stats().get("fusion", {})))
        self.metrics.register(SpeculativeCollector(lambda: self.engine.stats().get("medusa", {})))
        self.in_flight = 0
        self.tokens = TokenRate()

    def _residency_changed(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.nudge()

    def info(self) -> WorkerInfo:
        stats = self.engine.stats()
        return WorkerInfo(
            worker_id=self.config.worker_id,
            url=self.config.url,
            model_id=self.engine.model_id,
            capacity=int(stats.get("max_batch", 1)),
            in_flight=self.in_flight,
            resident_adapters=self.adapters.resident(),
            max_adapters=self.config.max_adapters,
            stats=load_report(stats, self.tokens.per_second()),
        )

    async def _events(self, req: WorkerGenerateRequest) -> AsyncIterator[TokenEvent]:
        """The engine's events for `req`; load errors and prompt errors raise before the first one."""
        prompt_ids = self.prompts.build(req)
        if req.adapter is not None:
            await self.adapters.ensure(req.adapter, req.adapter_path, req.merge)
        if req.medusa_path:
            await self.adapters.ensure_heads(req.adapter, req.medusa_path)
        gen_req = GenerationRequest(
            prompt_ids=prompt_ids, params=_sampling(req), adapter=req.adapter, request_id=req.request_id
        )
        self.in_flight += 1
        try:
            async for ev in self.engine.generate(gen_req):
                self.tokens.add()
                yield ev
        finally:
            self.in_flight -= 1

    async def load_medusa(self, path: str, attach_to: str | None) -> None:
        await self.adapters.load_heads(attach_to, path)

    async def generate(self, req: WorkerGenerateRequest) -> WorkerGenerateResult:
        ids: list[int] = []
        texts: list[str] = []
        logprobs: list[float] = []
        prompt_tokens, finish, speculative = 0, "length", None
        async for ev in self._events(req):
            speculative = ev.details or speculative
            ids.append(ev.token_id)
            texts.append(ev.text)
            if ev.logprob is not None:
                logprobs.append(ev.logprob)
            prompt_tokens = ev.prompt_tokens
            finish = ev.finish_reason or finish
        return WorkerGenerateResult(
            text="".join(texts),
            token_ids=ids,
            tokens=texts,
            logprobs=logprobs if req.params.logprobs else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
            finish_reason=finish,
            worker_id=self.config.worker_id,
            speculative=speculative,
        )

    async def stream(self, req: WorkerGenerateRequest) -> AsyncIterator[bytes]:
        """SSE bytes; the first event is awaited here so that errors still become an HTTP status."""
        events = aiter(self._events(req))
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        return self._sse_body(first, events)

    async def _sse_body(
        self, first: TokenEvent | None, events: AsyncIterator[TokenEvent]
    ) -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse(first)
            async for ev in events:
                yield _sse(ev)
        except AdapterdError as exc:
            yield b"data: " + json.dumps(exc.to_dict()).encode() + b"\n\n"
        finally:
            await events.aclose()


# ---- routes (thin) ------------------------------------------------------------------------------


async def get_service(request: Request) -> WorkerService:  # async: no threadpool hop per request
    return request.app.state.service


Service = Annotated[WorkerService, Depends(get_service)]


async def generate_route(body: WorkerGenerateRequest, service: Service) -> Response:
    if body.stream:
        return StreamingResponse(await service.stream(body), media_type="text/event-stream")
    return JSONResponse((await service.generate(body)).model_dump())


async def health_route(service: Service) -> dict:
    return {"status": "ok", "worker_id": service.config.worker_id, "model_id": service.engine.model_id}


async def stats_route(service: Service) -> dict:
    info = service.info()
    return {
        **service.engine.stats(),
        "in_flight": info.in_flight,
        "resident_adapters": info.resident_adapters,
    }


async def metrics_route(service: Service) -> Response:
    return Response(generate_latest(service.metrics), media_type=CONTENT_TYPE_LATEST)


async def load_route(body: AdapterLoadRequest, service: Service) -> dict:
    if body.kind == "medusa":  # heads: for the base's requests, or attached to a loaded adapter
        await service.load_medusa(body.path, body.attach_to)
        return {"name": body.name, "attach_to": body.attach_to, "resident_adapters": service.adapters.resident()}
    if body.attach_to is not None:
        raise InvalidRequestError("attach_to is only for kind 'medusa'", param="attach_to")
    await service.adapters.ensure(body.name, body.path)
    return {"name": body.name, "resident_adapters": service.adapters.resident()}


async def unload_route(body: AdapterUnloadRequest, service: Service) -> dict:
    service.adapters.unload(body.name)
    return {"name": body.name, "resident_adapters": service.adapters.resident()}


# ---- the one error boundary ---------------------------------------------------------------------


def _error(status: int, type_: str, message: str, param: str | None = None, code: str | None = None):
    body = {"error": {"type": type_, "message": message, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def install_error_boundary(app: FastAPI) -> None:
    @app.exception_handler(AdapterdError)
    async def _adapterd(_: Request, exc: AdapterdError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        if first.get("type") == "json_invalid":
            return _error(400, "invalid_request_error", "the body is not valid JSON", None, "invalid_json")
        return _error(422, "invalid_request_error", str(first.get("msg", exc)), loc, "validation_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "server_error", f"internal error: {type(exc).__name__}")


def create_app(engine: Any, config: WorkerServiceConfig) -> FastAPI:
    """The worker app. `engine` is started/stopped by whoever built it (the entry point, or a test)."""
    service = WorkerService(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.redis_url:
            service.heartbeat = Heartbeat(
                config.redis_url, service.info, config.heartbeat_ttl_s, config.interval_s
            )
            await service.heartbeat.start()
        try:
            yield
        finally:
            if service.heartbeat is not None:
                await service.heartbeat.stop()

    app = FastAPI(title="adapterd worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_api_route("/generate", generate_route, methods=["POST"])
    app.add_api_route("/health", health_route, methods=["GET"])
    app.add_api_route("/stats", stats_route, methods=["GET"])
    app.add_api_route("/metrics", metrics_route, methods=["GET"])
    app.add_api_route("/adapters/load", load_route, methods=["POST"])
    app.add_api_route("/adapters/unload", unload_route, methods=["POST"])
    install_error_boundary(app)
    return app


# ---- entry point --------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.service", description="adapterd model worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--advertise-url", default="", help="URL the gateway uses (default http://HOST:PORT)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--model", default=None, help="HF model folder (default: the packaged SmolLM2)")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--heartbeat-ttl", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights' dtype; auto: bfloat16 on CUDA, on CPU bfloat16 only where it measures faster")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 base (per-channel scales); adapters stay in --dtype")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--medusa", default=None, help="folder of Medusa heads for base-model requests")
    p.add_argument("--medusa-max-batch", type=int, default=4, help="decode plainly above this many rows")
    return p.parse_args(argv)


def _build_engine(args: argparse.Namespace) -> Any:
    from workers.engine.engine import Engine, EngineConfig

    model_path = args.model
    if not model_path:
        from workers.model.default_model import ensure_default_model

        model_path = str(ensure_default_model())
    wanted = {
        "model_path": str(model_path),
        "device": args.device,
        "dtype": args.dtype,
        "quantize": None if args.quantize == "none" else args.quantize,
        "max_batch": args.max_batch,
        "max_seq": args.max_seq,
        "max_loras": args.max_loras,
        "max_rank": args.max_rank,
        "medusa_max_batch": args.medusa_max_batch,
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = Engine(EngineConfig(**{k: v for k, v in wanted.items() if k in known}))
    if args.medusa:
        engine.core.load_medusa(args.medusa)
    return engine


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    config = WorkerServiceConfig(
        host=args.host,
        port=args.port,
        advertise_url=args.advertise_url,
        redis_url=args.redis_url,
        heartbeat_ttl_s=args.heartbeat_ttl,
        max_adapters=args.max_loras,
        **({"worker_id": args.worker_id} if args.worker_id else {}),
    )
    engine = _build_engine(args)
    engine.start()
    try:
        uvicorn.run(
            create_app(engine, config),
            host=args.host,
            port=args.port,
            log_level="warning",
            access_log=False,
            loop="uvloop",
            http="httptools",
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=5,
        )
    finally:
        with contextlib.suppress(Exception):
            engine.stop()


if __name__ == "__main__":
    main()
