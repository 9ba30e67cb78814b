"""The worker's HTTP service around one engine: generate (streamed as SSE or not), health, stats and the
internal adapter load/unload used by the gateway. Registers itself in Redis through `Heartbeat`. Every
route but `GET /health` needs a request signed with the cluster secret (`workers.service.request_auth`).
Errors (`workers.errors.AdapterdError`) become the JSON error shape at this module's one boundary.

Entry point: `python -m workers.service --port 9001 --redis-url redis://… --model PATH`, with the cluster
secret in `ADAPTERD_CLUSTER_SECRET` or `ADAPTERD_CLUSTER_SECRET_FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.context import Context
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import event_stream, tracing
from adapters_store import kinds as store_kinds
from adapters_store.backends import open_backend
from adapters_store.base_model import BaseModelSpec
from adapters_store.body_limit import BodyLimit
from adapters_store.cluster_auth import ClusterSecretError, ClusterSigner, RequestVerifier, load_secret
from adapters_store.error_shape import error_body, http_error, unexpected_error, validation_error
from adapters_store.json_logging import REQUEST_ID
from adapters_store.version_store import VersionStore
from adapters_store.wire import (
    AdapterLoadRequest,
    AdapterUnloadRequest,
    ChatMessage,
    WorkerDetokenizeRequest,
    WorkerGenerateRequest,
    WorkerGenerateResult,
    WorkerInfo,
    WorkerPromptEcho,
    WorkerTokenizeRequest,
)
from workers.engine.types import GenerationRequest, SamplingParams, TokenEvent
from workers.errors import AdapterdError, InvalidRequestError, PromptTooLongError, ShuttingDownError
from workers.model.quantized import MODES as QUANTIZE_MODES
from workers.service.adapter_fetcher import AdapterFetcher, AdapterSources
from workers.service.choices import ResultBuilder, TokenTexts, event_payload
from workers.service.config import WorkerServiceConfig
from workers.service.drain import Drain, DrainingServer
from workers.service.heartbeat import Heartbeat
from workers.service.load_report import TokenRate, load_report
from workers.service.prompt_logprobs import prompt_logprobs
from workers.service.request_auth import ClusterAuthMiddleware
from workers.service.residency_metrics import FusionCollector, residency_registry
from workers.service.speculative_metrics import SpeculativeCollector

log = logging.getLogger("adapterd.worker")
KEEP_ALIVE_S = 75  # idle keep-alive; above the gateway's pool keep-alive, so the gateway closes first


class PromptBuilder:
    """Text, token ids or chat messages → prompt token ids (chat through the model's template)."""

    def __init__(self, tokenizer: Any, max_tokens: int, max_chars: int):
        self._tok = tokenizer
        self._max_tokens, self._max_chars = max_tokens, max_chars  # bounds checked before any encoding

    def build(self, req: WorkerGenerateRequest) -> tuple[int, ...]:
        given = [x is not None for x in (req.prompt, req.prompt_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_ids, messages", param="prompt")
        self._check_size(req)
        if req.prompt_ids is not None:
            return self._checked_ids(req.prompt_ids)
        if req.messages is not None:
            return self._chat(req.messages)
        ids = tuple(self._tok.encode(req.prompt))
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def _check_size(self, req: WorkerGenerateRequest) -> None:
        if req.prompt_ids is not None and len(req.prompt_ids) > self._max_tokens:
            raise PromptTooLongError(
                f"{len(req.prompt_ids)} prompt tokens exceed this model's context of {self._max_tokens}",
                param="prompt")
        chars = len(req.prompt or "") + sum(len(m.content or "") + len(m.role) for m in req.messages or ())
        if chars > self._max_chars:
            raise PromptTooLongError(
                f"the prompt has {chars} characters; more than {self._max_chars} cannot fit this model's "
                f"context of {self._max_tokens} tokens", param="messages" if req.messages else "prompt")

    def tokenize(self, req: WorkerTokenizeRequest) -> tuple[int, ...]:
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt, messages", param="prompt")
        if req.messages is not None:
            return self._chat(req.messages)
        return tuple(self._tok.encode(req.prompt, add_special_tokens=req.add_special_tokens))

    def spans(self, prompt: str, add_special_tokens: bool) -> list[dict]:
        """Each token of `prompt` with its text and character span (TGI's /tokenize)."""
        enc = self._tok(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [{"id": i, "text": prompt[a:b], "start": a, "stop": b}
                for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(self._checked_ids(ids)))

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
        top_logprobs=p.top_logprobs if p.logprobs else 0,
        n=p.n,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        min_p=p.min_p,
        typical_p=p.typical_p,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        stop_token_ids=tuple(p.stop_token_ids),
        json_schema=p.json_schema,
    )


class WorkerService:
    """Runs generations on the engine, tracks in-flight requests, and describes the worker."""

    def __init__(self, engine: Any, config: WorkerServiceConfig):
        self.engine = engine
        self.config = config
        self.prompts = PromptBuilder(engine.tokenizer, engine.max_seq, engine.max_seq * config.max_chars_per_token)
        self.token_texts = TokenTexts(engine.tokenizer)
        self.heartbeat: Heartbeat | None = None
        sources = AdapterSources(VersionStore(open_backend(config.resolved_store_url)), config.cache_dir)
        self.adapters = AdapterFetcher(engine, sources, on_change=self._residency_changed,
                                      cache_max_bytes=config.adapter_cache_bytes)
        self.metrics = residency_registry(lambda: self.engine.stats().get("adapters", {}))
        self.metrics.register(FusionCollector(lambda: self.engine.stats().get("fusion", {})))
        self.metrics.register(SpeculativeCollector(lambda: self.engine.stats().get("medusa", {})))
        self.in_flight = 0
        self.tokens = TokenRate()
        self.drain = Drain(config.drain_grace_s)
        self.base_model = BaseModelSpec.from_folder(config.model_path).to_config() if config.model_path else None
        self._engine_ids = itertools.count()  # engine request ids stay unique whatever ids callers send

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
            base_model=self.base_model,
            max_model_len=int(getattr(self.engine, "max_seq", 0) or 0),
        )

    async def _prompt_ids(self, req: WorkerGenerateRequest) -> tuple[int, ...]:
        prompt_ids = await asyncio.to_thread(self.prompts.build, req)  # encoding stays off the event loop
        return prompt_ids[-req.truncate:] if req.truncate is not None else prompt_ids

    async def _prepare(self, req: WorkerGenerateRequest) -> GenerationRequest:
        """The engine's request: the prompt encoded and the adapter made resident."""
        prompt_ids = await self._prompt_ids(req)
        if req.adapter is not None:
            await self.adapters.ensure(req.adapter, req.adapter_path, req.merge)
        if req.medusa_path:
            await self.adapters.ensure_heads(req.adapter, req.medusa_path)
        return GenerationRequest(prompt_ids=prompt_ids, params=_sampling(req), adapter=req.adapter,
                                 request_id=f"{req.request_id or 'req'}#{next(self._engine_ids)}")

    async def _events(self, req: WorkerGenerateRequest, trace_parent: Context | None = None
                      ) -> AsyncIterator[TokenEvent]:
        """The engine's events for `req`; load errors and prompt errors raise before the first one.
        Traced as worker.generate → admission → first_token → decode (`adapters_store.tracing`)."""
        REQUEST_ID.set(req.request_id or None)  # this request's task: its log lines carry the id
        spans = tracing.RequestSpans("worker.generate", trace_parent, {
            "adapterd.request_id": req.request_id or "", "adapterd.worker": self.config.worker_id,
            "adapterd.adapter": req.adapter or "base"})
        spans.phase("worker.admission")
        start, ttft, tokens, status, prompt_tokens = time.perf_counter(), None, 0, "cancelled", 0
        try:
            gen_req = await self._prepare(req)
            prompt_tokens = len(gen_req.prompt_ids)
            spans.phase("worker.first_token")  # queued, admitted into the batch, prefilled
            self.in_flight += 1
            try:
                async for ev in self.engine.generate(gen_req):
                    self.tokens.add()
                    if self.drain.expired:
                        raise ShuttingDownError("the worker is shutting down and its drain grace period is over")
                    if ttft is None:
                        ttft = time.perf_counter() - start
                        spans.phase("worker.decode")
                    tokens += 1
                    yield ev
            finally:
                self.in_flight -= 1
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            summary = {"adapter": req.adapter or "base", "worker": self.config.worker_id,
                       "prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                       "ttft_s": None if ttft is None else round(ttft, 6), "status": status,
                       "latency_s": round(time.perf_counter() - start, 6), "trace_id": tracing.trace_id(spans.root)}
            spans.end(status == "error", {f"adapterd.{k}": v for k, v in summary.items() if v is not None})
            log.info("request", extra=summary)

    async def leave(self) -> None:
        """Out of the placement set at once (draining): deregister and stop heartbeating."""
        if self.heartbeat is not None:
            await self.heartbeat.stop()

    async def load_medusa(self, path: str, attach_to: str | None) -> None:
        await self.adapters.load_heads(attach_to, path)

    async def generate(self, req: WorkerGenerateRequest, trace_parent: Context | None = None
                       ) -> WorkerGenerateResult:
        result = ResultBuilder(req.params.n, req.params.logprobs, self.token_texts)
        async for ev in self._events(req, trace_parent):
            result.add(ev)
        done = result.result(self.config.worker_id)
        if req.echo:  # after the completion: its adapter is resident by now
            done.prompt = await self._echo(req)
        return done

    async def _echo(self, req: WorkerGenerateRequest) -> WorkerPromptEcho:
        """The prompt's tokens, and with logprobs their raw logprobs and top-k (`workers.service.prompt_logprobs`)."""
        ids = await self._prompt_ids(req)
        text = req.prompt if req.prompt is not None else self.prompts.detokenize(list(ids))
        echo = WorkerPromptEcho(text=text, token_ids=list(ids), tokens=[self.token_texts.text(t) for t in ids])
        if req.params.logprobs:
            scored = await prompt_logprobs(self.engine, ids, req.params.top_logprobs, req.adapter,
                                           req.request_id or "echo")
            echo.logprobs = [None if s is None else s[0] for s in scored]
            echo.top_logprobs = [None if s is None else self.token_texts.top(s[1]) for s in scored]
        return echo

    def _sse(self, ev: TokenEvent) -> bytes:
        return event_stream.event(event_payload(ev, self.token_texts))

    async def stream(self, req: WorkerGenerateRequest, trace_parent: Context | None = None
                     ) -> AsyncIterator[bytes]:
        """SSE bytes; the first event is awaited here so that errors still become an HTTP status."""
        events = aiter(self._events(req, trace_parent))
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
                yield self._sse(first)
            async for ev in events:
                yield self._sse(ev)
        except AdapterdError as exc:
            yield event_stream.event(exc.to_dict())
        finally:
            await events.aclose()


# ---- routes (thin) ------------------------------------------------------------------------------


async def get_service(request: Request) -> WorkerService:  # async: no threadpool hop per request
    return request.app.state.service


Service = Annotated[WorkerService, Depends(get_service)]


async def generate_route(body: WorkerGenerateRequest, service: Service, request: Request) -> Response:
    parent = tracing.extract(request.headers)  # the gateway's span, from its traceparent header
    if body.stream and body.echo:
        raise InvalidRequestError("echo is answered only without stream", param="echo")
    if body.stream:
        return StreamingResponse(await service.stream(body, parent), media_type="text/event-stream")
    return JSONResponse((await service.generate(body, parent)).model_dump())


async def tokenize_route(body: WorkerTokenizeRequest, service: Service) -> dict:
    """Encoding (and chat templates) run in a thread, never on the event loop."""
    if body.offsets and body.prompt is not None:
        return {"spans": await asyncio.to_thread(service.prompts.spans, body.prompt, body.add_special_tokens)}
    ids = await asyncio.to_thread(service.prompts.tokenize, body)
    return {"tokens": list(ids), "count": len(ids), "max_model_len": service.info().max_model_len}


async def detokenize_route(body: WorkerDetokenizeRequest, service: Service) -> dict:
    return {"prompt": await asyncio.to_thread(service.prompts.detokenize, body.tokens)}


async def health_route(service: Service) -> dict:
    return {"status": "ok", "worker_id": service.config.worker_id, "model_id": service.engine.model_id}


async def ready_route(service: Service) -> JSONResponse:
    """200 once the model is loaded (the app starts after it) and the worker is registered, until it drains."""
    registered = service.config.redis_url is None or (
        service.heartbeat is not None and service.heartbeat.registered)
    ready = registered and not service.drain.draining
    body = {"ready": ready, "draining": service.drain.draining, "worker_id": service.config.worker_id}
    return JSONResponse(body, status_code=200 if ready else 503)


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
    if store_kinds.are_heads(body.kind):  # heads: for the base's requests, or attached to a loaded adapter
        await service.load_medusa(body.path, body.attach_to)
        return {"name": body.name, "attach_to": body.attach_to, "resident_adapters": service.adapters.resident()}
    if body.attach_to is not None:
        raise InvalidRequestError("attach_to is only for kind 'medusa'", param="attach_to")
    await service.adapters.ensure(body.name, body.path)
    return {"name": body.name, "resident_adapters": service.adapters.resident()}


async def unload_route(body: AdapterUnloadRequest, service: Service) -> dict:
    await service.adapters.unload(body.name)
    return {"name": body.name, "resident_adapters": service.adapters.resident()}


# ---- the one error boundary ---------------------------------------------------------------------


def install_error_boundary(app: FastAPI) -> None:
    @app.exception_handler(AdapterdError)
    async def _adapterd(_: Request, exc: AdapterdError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, body = validation_error(exc.errors())
        return JSONResponse(body, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(http_error(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(unexpected_error(exc), status_code=500)


def create_app(engine: Any, config: WorkerServiceConfig) -> FastAPI:
    """The worker app. `engine` is started/stopped by whoever built it (the entry point, or a test)."""
    signer = ClusterSigner(config.cluster_secret)  # raises ClusterSecretError without a usable secret
    service = WorkerService(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if config.redis_url:
            service.heartbeat = Heartbeat(
                config.redis_url, service.info, config.heartbeat_ttl_s, config.interval_s, signer
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
    app.add_api_route("/ready", ready_route, methods=["GET"])
    app.add_api_route("/tokenize", tokenize_route, methods=["POST"])
    app.add_api_route("/detokenize", detokenize_route, methods=["POST"])
    app.add_api_route("/stats", stats_route, methods=["GET"])
    app.add_api_route("/metrics", metrics_route, methods=["GET"])
    app.add_api_route("/adapters/load", load_route, methods=["POST"])
    app.add_api_route("/adapters/unload", unload_route, methods=["POST"])
    install_error_boundary(app)
    app.add_middleware(ClusterAuthMiddleware, verifier=RequestVerifier(config.cluster_secret))
    app.add_middleware(BodyLimit, limit_for=lambda _: config.max_request_bytes,
                       refuse=lambda limit: JSONResponse(error_body(
                           "invalid_request_error", f"request body over {limit} bytes", code="payload_too_large"),
                           status_code=413))
    return app


# ---- entry point --------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.service", description="adapterd model worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--advertise-url", default="", help="URL the gateway uses (default http://HOST:PORT)")
    p.add_argument("--redis-url", default=os.environ.get("ADAPTERD_REDIS_URL"),
                   help="default: $ADAPTERD_REDIS_URL (keeps a password off the command line)")
    p.add_argument("--model", default=None, help="HF model folder (default: the packaged SmolLM2)")
    p.add_argument("--data-dir", default=os.environ.get("ADAPTERD_DATA_DIR", ".adapterd"),
                   help="the store/ (unless --store-url) and the worker's cache")
    p.add_argument("--store-url", default=os.environ.get("ADAPTERD_STORE_URL", ""),
                   help="the adapter store (file:// or s3://; default DATA_DIR/store, as the gateway's)")
    p.add_argument("--worker-id", default=None)
    p.add_argument("--heartbeat-ttl", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="base weights' dtype; auto: bfloat16 on CUDA, on CPU bfloat16 only where it measures faster")
    p.add_argument("--quantize", default="none", choices=["none", *QUANTIZE_MODES],
                   help="int8: weight-only int8 base (per-channel scales); w8a8: int8 weights and int8 activations "
                        "(one scale per token, at run time); int4: weight-only 4-bit groups of 32 (CPU); fp16: "
                        "weight-only half precision with fp32 tokens; adapters stay in --dtype")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--max-rank", type=int, default=16)
    p.add_argument("--max-seq", "--max-model-len", dest="max_seq", type=int, default=None,
                   help="tokens per sequence, prompt included (default: the model's max_position_embeddings, "
                        "capped so the KV cache of --max-batch sequences fits --kv-cache-gib)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV-cache budget for the default --max-seq "
                   "(default 2)")
    p.add_argument("--medusa", default=None, help="folder of Medusa heads for base-model requests")
    p.add_argument("--medusa-max-batch", type=int, default=4, help="decode plainly above this many rows")
    p.add_argument("--medusa-policy", choices=("measured", "always"), default="measured",
                   help="measured: speculate only while the measured cost model expects a gain; always: verify "
                        "the full tree on every eligible step")
    p.add_argument("--adapter-cache-bytes", type=int, default=2 * 1024**3,
                   help="disk for materialised adapter versions and merges (least recently used go first)")
    p.add_argument("--drain-grace", type=float, default=float(os.environ.get("ADAPTERD_DRAIN_GRACE_S", 30.0)),
                   help="SIGTERM: seconds in-flight requests get to finish before they end with an error")
    p.add_argument("--otlp-endpoint", default=None, help="send OpenTelemetry traces to this OTLP/HTTP base URL "
                   "(default: $OTEL_EXPORTER_OTLP_ENDPOINT; neither: tracing off)")
    return p.parse_args(argv)


def _build_engine(args: argparse.Namespace) -> Any:
    from workers.engine.engine import Engine, EngineConfig

    max_seq = args.max_seq
    if max_seq is None:
        from workers.service.context_length import DEFAULT_KV_CACHE_GIB, default_max_seq

        max_seq = default_max_seq(args.model, args.max_batch, args.dtype, args.kv_cache_gib or DEFAULT_KV_CACHE_GIB)
    wanted = {
        "model_path": str(args.model),
        "device": args.device,
        "dtype": args.dtype,
        "quantize": None if args.quantize == "none" else args.quantize,
        "max_batch": args.max_batch,
        "max_seq": max_seq,
        "max_loras": args.max_loras,
        "max_rank": args.max_rank,
        "medusa_max_batch": args.medusa_max_batch,
        "medusa_policy": args.medusa_policy,
    }
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = Engine(EngineConfig(**{k: v for k, v in wanted.items() if k in known}))
    if args.medusa:
        engine.core.load_medusa(args.medusa)
    return engine


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = _parse_args(argv)
    from adapters_store.json_logging import configure

    configure("worker", logging.INFO)
    tracing.configure("adapterd-worker", tracing.traces_url(args.otlp_endpoint))
    try:
        secret = load_secret()
    except ClusterSecretError as exc:
        print(f"adapterd worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if not args.model:
        from workers.model.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    config = WorkerServiceConfig(
        host=args.host,
        port=args.port,
        advertise_url=args.advertise_url,
        redis_url=args.redis_url,
        heartbeat_ttl_s=args.heartbeat_ttl,
        max_adapters=args.max_loras,
        cluster_secret=secret,
        data_dir=Path(args.data_dir),
        store_url=args.store_url,
        adapter_cache_bytes=args.adapter_cache_bytes,
        model_path=str(args.model),
        drain_grace_s=args.drain_grace,
        **({"worker_id": args.worker_id} if args.worker_id else {}),
    )
    engine = _build_engine(args)
    engine.start()
    try:
        app = create_app(engine, config)
        service: WorkerService = app.state.service
        uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                   log_config=None,  # uvicorn's own loggers propagate to the JSON handler
                                   loop="uvloop", http="httptools", timeout_keep_alive=KEEP_ALIVE_S)
        DrainingServer(uv_config, service.drain, service.leave).run()
    finally:
        with contextlib.suppress(Exception):
            engine.stop()


if __name__ == "__main__":
    main()
