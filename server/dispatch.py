"""From a resolved model and a worker request to worker results: model resolution (base or adapter,
404 otherwise), routing, one retry on another worker when a worker fails before the first byte, and
the per-adapter / per-worker metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from adapters_store.json_logging import REQUEST_ID
from adapters_store.wire import WorkerGenerateRequest, WorkerMerge
from server.auth import Tenant
from server.dropin_adapters import AdapterVersion
from server.errors import (
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    NoWorkerError,
    WorkerUnreachableError,
)
from server.metrics import GatewayMetrics
from server.request_context import note
from server.router import Lease, WorkerRouter
from server.worker_client import WorkerClient, WorkerStream
from server.worker_registry import WorkerRegistry

ATTEMPTS = 2  # the first worker, and one other if the first fails before answering


class ModelResolver(Protocol):
    """What the dispatcher asks of the adapter registry (`server.tenant_adapters.TenantAdapters`)."""

    def resolve(self, model: str, tenant: Tenant) -> Any: ...  # an adapter version with `ref`, `source`; or None
    def heads_path(self, adapter_ref: str | None) -> str | None: ...


@dataclass(frozen=True)
class MergedAdapter:
    """A per-request merge: `ref` names it on the engine (a content key), `merge` says how to build it."""

    ref: str
    merge: WorkerMerge


@dataclass(frozen=True)
class Target:
    model: str  # as the client named it (echoed back in responses)
    adapter: AdapterVersion | MergedAdapter | None  # None → the base model
    base_heads: str | None = None  # the base's Medusa heads (for base-model targets), if any

    @property
    def label(self) -> str:
        return self.adapter.ref if self.adapter else "base"


@dataclass
class Completion:
    """A finished non-streamed generation and the worker that made it."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float] | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    worker_id: str
    speculative: dict | None = None  # Medusa: tokens per decode step (see WorkerGenerateResult)
    top_logprobs: list[list[list]] | None = None  # per token: [id, text, raw logprob], best first
    choices: list[dict] | None = None  # n > 1: every completion (`WorkerChoice`); the fields above: choice 0
    prompt: dict | None = None  # echo: the prompt's tokens (`WorkerPromptEcho`)

    def all_choices(self) -> list[dict]:
        """Each completion as a `WorkerChoice` dict (one when n = 1)."""
        if self.choices:
            return self.choices
        return [{"index": 0, "text": self.text, "token_ids": self.token_ids, "tokens": self.tokens,
                 "logprobs": self.logprobs, "top_logprobs": self.top_logprobs, "finish_reason": self.finish_reason}]


class Dispatcher:
    def __init__(
        self,
        catalog: ModelResolver,
        registry: WorkerRegistry,
        router: WorkerRouter,
        client: WorkerClient,
        metrics: GatewayMetrics,
        retry_after_s: int,
        model_id: str = "",
    ):
        self._catalog = catalog
        self._registry = registry
        self._router = router
        self._client = client
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._model_id = model_id

    @property
    def base_model_id(self) -> str | None:
        return self._registry.base_model_id or self._model_id or None

    def resolve(self, model: str | None, merged: MergedAdapter | None, tenant: Tenant) -> Target:
        """`None`/base id → base; `name` / `name@version` → that adapter; anything else → 404. The base
        id is checked first: it costs nothing, while an adapter lookup reads the store (blocking: services
        call this off the event loop). With a per-request merge, the model must be the base (or unset)."""
        base = self.base_model_id
        if merged is not None:
            if model is not None and model != base:
                raise InvalidRequestError(
                    f"merged_adapters applies to the base model {base!r}: name it (or no model), not {model!r}",
                    param="merged_adapters")
            return Target(model or base or "", merged)
        if model is None or (base is not None and model == base):
            return Target(model or base or "", None, self._catalog.heads_path(None))
        adapter = self._catalog.resolve(model, tenant)
        if adapter is not None:
            return Target(model, adapter)
        if base is None:
            raise NoWorkerError(
                "no worker has registered yet, so the base model is unknown",
                retry_after_s=self._retry_after_s,
            )
        raise ModelNotFoundError(
            f"the model {model!r} does not exist: it is neither the base model {base!r} nor a known adapter",
            param="model",
        )

    def _payload(self, target: Target, req: WorkerGenerateRequest, stream: bool) -> bytes:
        update: dict = {"stream": stream, "request_id": REQUEST_ID.get() or req.request_id}
        if isinstance(target.adapter, MergedAdapter):
            update |= {"adapter": target.adapter.ref, "merge": target.adapter.merge}
        elif target.adapter is not None:
            update |= {"adapter": target.adapter.ref, "adapter_path": target.adapter.source,
                       "medusa_path": target.adapter.heads}
        else:
            update |= {"medusa_path": target.base_heads}  # the base's heads, if any
        return req.model_copy(update=update).model_dump_json(exclude_none=True).encode()

    async def _acquire(self, target: Target, exclude: list[str]) -> Lease:
        note(adapter=target.label)
        self._metrics.queue_waiting.set(self._router.waiting + 1)
        try:
            return await self._router.acquire(target.adapter.ref if target.adapter else None, exclude)
        except NoWorkerError as exc:
            self._metrics.rejected.labels(exc.code).inc()
            raise
        finally:
            self._metrics.queue_waiting.set(self._router.waiting)

    def _exhausted(self) -> NoWorkerError:
        return NoWorkerError(
            "no worker could take the request (the ones tried failed)",
            retry_after_s=self._retry_after_s,
            code="worker_unreachable",
        )

    def _failed(self, lease: Lease, exclude: list[str]) -> None:
        worker_id = lease.worker.worker_id
        self._registry.mark_down(worker_id)
        exclude.append(worker_id)
        self._metrics.retries.labels(worker_id).inc()

    async def generate(self, target: Target, req: WorkerGenerateRequest) -> Completion:
        body = self._payload(target, req, stream=False)
        exclude: list[str] = []
        start = time.perf_counter()
        for attempt in range(ATTEMPTS):
            lease = await self._acquire(target, exclude)
            worker = lease.worker.worker_id
            try:
                result = await self._client.post(lease.worker.url, "/generate", body)
            except WorkerUnreachableError:
                self._failed(lease, exclude)
                if attempt == ATTEMPTS - 1:
                    raise self._exhausted() from None
                continue
            except GatewayError:
                self._metrics.requests.labels(target.label, worker, "error").inc()
                raise
            finally:
                lease.release()
            done = Completion(**{k: result[k] for k in Completion.__dataclass_fields__ if k in result})
            self._record(target, worker, start, done.prompt_tokens, done.completion_tokens)
            return done
        raise AssertionError("unreachable")

    async def stream(self, target: Target, req: WorkerGenerateRequest) -> AsyncIterator[list[dict]]:
        """Worker token events (dicts), in batches as they arrived. Returns once the first event arrived,
        so that routing errors, worker errors and retries all happen before the client sees a byte."""
        body = self._payload(target, req, stream=True)
        exclude: list[str] = []
        start = time.perf_counter()
        for attempt in range(ATTEMPTS):
            lease = await self._acquire(target, exclude)
            try:
                stream = await self._client.open_stream(lease.worker.url, body, req.params.n)
            except WorkerUnreachableError:
                lease.release()
                self._failed(lease, exclude)
                if attempt == ATTEMPTS - 1:
                    raise self._exhausted() from None
                continue
            except BaseException:
                lease.release()
                self._metrics.requests.labels(target.label, lease.worker.worker_id, "error").inc()
                raise
            ttft = time.perf_counter() - start
            self._metrics.ttft.labels(target.label, lease.worker.worker_id).observe(ttft)
            note(ttft_s=round(ttft, 6))
            return self._relay(target, lease, stream, start)
        raise AssertionError("unreachable")

    async def _relay(
        self, target: Target, lease: Lease, stream: WorkerStream, start: float
    ) -> AsyncIterator[list[dict]]:
        worker = lease.worker.worker_id
        count, prompt_tokens, outcome = 0, 0, "error"
        try:
            async for batch in stream:
                count += len(batch)
                prompt_tokens = batch[-1]["prompt_tokens"]
                yield batch
            outcome = "ok"
        except WorkerUnreachableError:
            self._registry.mark_down(worker)
            raise
        except (GeneratorExit, asyncio.CancelledError):  # the client went away
            outcome = "cancelled"
            raise
        finally:
            lease.release()
            await stream.aclose()
            if outcome == "ok":
                self._record(target, worker, start, prompt_tokens, count)
            else:
                self._metrics.requests.labels(target.label, worker, outcome).inc()

    def _record(self, target: Target, worker: str, start: float, prompt_tokens: int, completion_tokens: int):
        label = target.label
        note(adapter=label, worker=worker, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        self._metrics.requests.labels(label, worker, "ok").inc()
        self._metrics.latency.labels(label, worker).observe(time.perf_counter() - start)
        self._metrics.prompt_tokens.labels(label, worker).inc(prompt_tokens)
        self._metrics.completion_tokens.labels(label, worker).inc(completion_tokens)
