"""vLLM's endpoints beyond OpenAI's: /tokenize and /detokenize (answered by a worker, which holds the
tokenizer), the context length of the model cards, and the operator's /v1/load_lora_adapter and
/v1/unload_lora_adapter. Loading takes a folder from the operator's allow-list (`ADAPTERD_ADAPTER_ALLOW_DIRS`,
default DATA_DIR/adapters), validates and publishes it in the store like an upload (public: the operator
serves it to every tenant), and warms it on the least loaded worker; unloading deletes it from the store
(requests for it are 404 from then on) and drops it from the workers that hold it."""

from __future__ import annotations

import asyncio
import contextlib

from adapters_store.validation import UploadedFile
from adapters_store.wire import (
    AdapterLoadRequest,
    AdapterUnloadRequest,
    ChatMessage,
    WorkerDetokenizeRequest,
    WorkerTokenizeRequest,
)
from server.allowed_folders import AllowList
from server.auth import Tenant
from server.dispatch import Dispatcher, Target
from server.errors import GatewayError, InvalidRequestError, ModelNotFoundError, NoWorkerError
from server.protocol import DetokenizeRequest, LoadLoraAdapterRequest, TokenizeRequest, TokenizeResponse
from server.tenant_adapters import StoredAdapter, TenantAdapters, visible
from server.worker_client import WorkerClient
from server.worker_registry import WorkerRegistry, WorkerView


class VllmService:
    def __init__(self, dispatcher: Dispatcher, registry: WorkerRegistry, client: WorkerClient,
                 adapters: TenantAdapters, allow: AllowList, max_bytes: int, retry_after_s: int):
        self._dispatcher, self._registry, self._client = dispatcher, registry, client
        self._adapters, self._allow, self._max_bytes, self._retry_after_s = adapters, allow, max_bytes, retry_after_s

    def max_model_len(self) -> int | None:
        """The smallest context any live worker serves (they normally agree)."""
        lens = [w.info.max_model_len for w in self._registry.alive() if w.info.max_model_len]
        return min(lens) if lens else None

    def _least_loaded(self) -> WorkerView:
        workers = self._registry.alive()
        if not workers:
            raise NoWorkerError("no worker is registered", retry_after_s=self._retry_after_s)
        return min(workers, key=lambda w: w.load())

    async def _post(self, worker: WorkerView, path: str, body) -> dict:
        return await self._client.post(worker.url, path, body.model_dump_json(exclude_none=True).encode())

    def _known_model(self, model: str | None, tenant: Tenant) -> Target:
        """404 unless `model` is the base (no store read) or an adapter the tenant may use: one resolution,
        whose manifest the visibility check reads. Blocking: called off the event loop."""
        target = self._dispatcher.resolve(model, None, tenant)
        if isinstance(target.adapter, StoredAdapter) and not visible(target.adapter.manifest, tenant):
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        return target

    async def tokenize(self, req: TokenizeRequest, tenant: Tenant) -> TokenizeResponse | list[dict]:
        await asyncio.to_thread(self._known_model, req.model, tenant)
        if sum(x is not None for x in (req.prompt, req.messages, req.inputs)) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages, inputs", param="prompt")
        if req.inputs is not None:  # TGI/LoRAX: tokens with their text and character spans
            body = WorkerTokenizeRequest(prompt=req.inputs, add_special_tokens=req.add_special_tokens, offsets=True)
            return (await self._post(self._least_loaded(), "/tokenize", body))["spans"]
        if req.messages is not None and not req.add_generation_prompt:
            raise InvalidRequestError("only add_generation_prompt: true is supported", param="add_generation_prompt")
        messages = [ChatMessage(role=m.role, content=m.text()) for m in req.messages] if req.messages else None
        body = WorkerTokenizeRequest(prompt=req.prompt, messages=messages, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(**await self._post(self._least_loaded(), "/tokenize", body))

    async def detokenize(self, req: DetokenizeRequest, tenant: Tenant) -> str:
        await asyncio.to_thread(self._known_model, req.model, tenant)
        result = await self._post(self._least_loaded(), "/detokenize", WorkerDetokenizeRequest(tokens=req.tokens))
        return result["prompt"]

    async def load_lora(self, tenant: Tenant, req: LoadLoraAdapterRequest) -> StoredAdapter:
        folder = await asyncio.to_thread(self._allow.check, req.lora_path, "lora_path")
        files = await asyncio.to_thread(self._allow.read, folder, self._max_bytes, "lora_path")
        uploads = [UploadedFile(name, data) for name, data in files.items()]
        await asyncio.to_thread(self._adapters.upload, tenant, req.lora_name, uploads, None, None, True)
        stored = await asyncio.to_thread(self._adapters.resolve, req.lora_name, tenant)
        assert isinstance(stored, StoredAdapter)
        worker = self._least_loaded()
        await self._post(worker, "/adapters/load", AdapterLoadRequest(name=stored.ref, path=stored.source))
        worker.assume(stored.ref)
        return stored

    async def unload_lora(self, tenant: Tenant, name: str) -> list[str]:
        info = await asyncio.to_thread(self._adapters.describe, tenant, name)
        refs = [v.id for v in info.versions]
        await asyncio.to_thread(self._adapters.delete, tenant, name)
        for worker in self._registry.alive():
            for ref in refs:
                if worker.holds(ref):
                    with contextlib.suppress(GatewayError):  # gone already, or the worker died: nothing to drop
                        await self._post(worker, "/adapters/unload", AdapterUnloadRequest(name=ref))
        return refs
