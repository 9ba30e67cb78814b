"""The asynchronous client (httpx.AsyncClient). Mirrors `Client` method for method."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
from httpx_sse import EventSource, SSEError

from adapterd_client.base import _DONE, BaseClient, Call
from adapterd_client.errors import APIConnectionError
from adapterd_client.models import (
    AdapterDeleted,
    AdapterInfo,
    AdapterList,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    GenerateResponse,
    ModelList,
    ReadyStatus,
    StreamResponse,
)


class AsyncClient(BaseClient):
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options,
    ):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- API ----------------------------------------------------------------------------------

    async def completions(self, model: str, prompt: str | list, **params) -> Completion:
        return await self._request(self._completions_call(model, prompt, False, params))

    async def completions_stream(self, model: str, prompt: str | list, **params) -> AsyncIterator[Completion]:
        return await self._stream(self._completions_call(model, prompt, True, params))

    async def chat(self, model: str, messages: list[dict], **params) -> ChatCompletion:
        return await self._request(self._chat_call(model, messages, False, params))

    async def chat_stream(self, model: str, messages: list[dict], **params) -> AsyncIterator[ChatCompletionChunk]:
        return await self._stream(self._chat_call(model, messages, True, params))

    async def models(self) -> ModelList:
        return await self._request(self._models_call())

    async def generate(self, inputs: str, adapter_id: str | None = None, **parameters) -> GenerateResponse:
        return await self._request(self._generate_call(inputs, adapter_id, False, parameters))

    async def generate_stream(
        self, inputs: str, adapter_id: str | None = None, **parameters
    ) -> AsyncIterator[StreamResponse]:
        return await self._stream(self._generate_call(inputs, adapter_id, True, parameters))

    # ---- adapters -----------------------------------------------------------------------------

    async def upload_adapter(
        self,
        name: str,
        *paths: str | Path,
        kind: str | None = None,
        compression: dict | None = None,
        public: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> AdapterInfo:
        """Uploads a PEFT folder, an archive of one, or a .safetensors + its config JSON as a new version
        of `name`. `compression`: e.g. {"method": "compeft", "density": 0.1, "alpha": 1.0}."""
        return await self._request(self._upload_adapter_call(name, list(paths), kind, compression, public, progress))

    async def list_adapters(self) -> AdapterList:
        return await self._request(self._list_adapters_call())

    async def get_adapter(self, name: str) -> AdapterInfo:
        return await self._request(self._get_adapter_call(name))

    async def delete_adapter(self, ref: str) -> AdapterDeleted:
        """`name@version` deletes one version; `name` deletes them all."""
        return await self._request(self._delete_adapter_call(ref))

    async def save_merge(self, name: str, merged_adapters: dict, public: bool = False) -> AdapterInfo:
        """Merges adapters and stores the result as a new version of `name` (see `Client.save_merge`)."""
        return await self._request(self._save_merge_call(name, merged_adapters, public))

    async def download_adapter(self, ref: str) -> bytes:
        """A zip of the PEFT folder (decoded to dense safetensors if stored compressed)."""
        return await self._request(self._download_adapter_call(ref))

    # ---- fine-tune files and jobs -------------------------------------------------------------

    async def upload_file(self, path: str | Path, purpose: str = "fine-tune",
                    progress: Callable[[int], None] | None = None) -> FileObject:
        """Uploads a JSONL training file (every line is checked; a bad one is refused with its number)."""
        return await self._request(self._upload_file_call(path, purpose, progress))

    async def list_files(self, purpose: str | None = None) -> FileList:
        return await self._request(self._list_files_call(purpose))

    async def get_file(self, file_id: str) -> FileObject:
        return await self._request(self._get_file_call(file_id))

    async def file_content(self, file_id: str) -> bytes:
        """A file's bytes (a training file as uploaded, or a job's result CSV)."""
        return await self._request(self._file_content_call(file_id))

    async def ready(self) -> ReadyStatus:
        """The gateway's readiness, with the workers and fine-tune trainers alive (503 → ServiceUnavailableError)."""
        return await self._request(self._ready_call())

    async def delete_file(self, file_id: str) -> FileDeleted:
        return await self._request(self._delete_file_call(file_id))

    async def create_job(self, model: str, training_file: str, method: dict | None = None, *,
                   validation_file: str | None = None, suffix: str | None = None, seed: int | None = None,
                   compression: dict | None = None, hyperparameters: dict | None = None,
                   metadata: dict[str, str] | None = None) -> FineTuningJob:
        """A fine-tune job of base `model` on an uploaded file; `method`: {"type": "lora"|"s2ft"|"medusa", ...}
        or OpenAI's nested form; hyperparameters default to "auto" (resolved from the file's size)."""
        options = {"validation_file": validation_file, "suffix": suffix, "seed": seed, "compression": compression,
                   "hyperparameters": hyperparameters, "metadata": metadata}
        return await self._request(self._create_job_call(model, training_file, method, options))

    async def list_jobs(self, after: str | None = None, limit: int | None = None) -> FineTuningJobList:
        return await self._request(self._list_jobs_call(after, limit))

    async def get_job(self, job_id: str) -> FineTuningJob:
        return await self._request(self._get_job_call(job_id))

    async def cancel_job(self, job_id: str) -> FineTuningJob:
        return await self._request(self._cancel_job_call(job_id))

    async def list_job_events(self, job_id: str, after: str | None = None,
                        limit: int | None = None) -> FineTuningJobEventList:
        """Newest first; `after` (an event id) pages to older ones."""
        return await self._request(self._job_events_call(job_id, after, limit))

    async def follow_job(self, job_id: str, after: str | None = None) -> AsyncIterator[FineTuningJobEvent]:
        """Every event oldest first, then new ones as they happen, until the job has finished."""
        return await self._stream(self._follow_job_call(job_id, after))

    async def list_job_checkpoints(self, job_id: str, after: str | None = None,
                             limit: int | None = None) -> FineTuningJobCheckpointList:
        return await self._request(self._job_checkpoints_call(job_id, after, limit))

    # ---- transport ----------------------------------------------------------------------------

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(call.method, call.path, **call.request_args())
            try:
                response = await self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                delay = self._delay(call, attempt, None)
                if delay is None:
                    raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                delay = self._delay(call, attempt, response)
                if delay is None:
                    raise self._error(response)
            await asyncio.sleep(delay)
            attempt += 1

    async def _request(self, call: Call):
        return self._parse(call, await self._send(call))

    async def _stream(self, call: Call) -> AsyncIterator:
        response = await self._send(call)  # errors before the stream starts raise here
        return self._events(call, response)

    async def _events(self, call: Call, response: httpx.Response) -> AsyncIterator:
        try:
            async for event in EventSource(response).aiter_sse():
                item = self._sse_item(call, event)
                if item is _DONE:
                    return
                if item is not None:
                    yield item
        except SSEError as exc:  # a 200 that is not text/event-stream
            raise self._not_a_stream(response, exc) from exc
        finally:
            await response.aclose()
