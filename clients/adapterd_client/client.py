"""The synchronous client (httpx.Client). Mirrors `AsyncClient` method for method."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


class Client(BaseClient):
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **options,
    ):
        super().__init__(base_url, api_key, **options)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers(), timeout=self.timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- API ----------------------------------------------------------------------------------

    def completions(self, model: str, prompt: str | list, **params) -> Completion:
        return self._request(self._completions_call(model, prompt, False, params))

    def completions_stream(self, model: str, prompt: str | list, **params) -> Iterator[Completion]:
        return self._stream(self._completions_call(model, prompt, True, params))

    def chat(self, model: str, messages: list[dict], **params) -> ChatCompletion:
        return self._request(self._chat_call(model, messages, False, params))

    def chat_stream(self, model: str, messages: list[dict], **params) -> Iterator[ChatCompletionChunk]:
        return self._stream(self._chat_call(model, messages, True, params))

    def models(self) -> ModelList:
        return self._request(self._models_call())

    def generate(self, inputs: str, adapter_id: str | None = None, **parameters) -> GenerateResponse:
        return self._request(self._generate_call(inputs, adapter_id, False, parameters))

    def generate_stream(self, inputs: str, adapter_id: str | None = None, **parameters) -> Iterator[StreamResponse]:
        return self._stream(self._generate_call(inputs, adapter_id, True, parameters))

    # ---- adapters -----------------------------------------------------------------------------

    def upload_adapter(
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
        return self._request(self._upload_adapter_call(name, list(paths), kind, compression, public, progress))

    def list_adapters(self) -> AdapterList:
        return self._request(self._list_adapters_call())

    def get_adapter(self, name: str) -> AdapterInfo:
        return self._request(self._get_adapter_call(name))

    def delete_adapter(self, ref: str) -> AdapterDeleted:
        """`name@version` deletes one version; `name` deletes them all."""
        return self._request(self._delete_adapter_call(ref))

    def save_merge(self, name: str, merged_adapters: dict, public: bool = False) -> AdapterInfo:
        """Merges adapters ({"ids", "weights", "strategy", "density"}, as the per-request `merged_adapters`
        parameter does) and stores the result as a new version of `name`."""
        return self._request(self._save_merge_call(name, merged_adapters, public))

    def download_adapter(self, ref: str) -> bytes:
        """A zip of the PEFT folder (decoded to dense safetensors if stored compressed)."""
        return self._request(self._download_adapter_call(ref))

    # ---- fine-tune files and jobs -------------------------------------------------------------

    def upload_file(self, path: str | Path, purpose: str = "fine-tune",
                    progress: Callable[[int], None] | None = None) -> FileObject:
        """Uploads a JSONL training file (every line is checked; a bad one is refused with its number)."""
        return self._request(self._upload_file_call(path, purpose, progress))

    def list_files(self, purpose: str | None = None) -> FileList:
        return self._request(self._list_files_call(purpose))

    def get_file(self, file_id: str) -> FileObject:
        return self._request(self._get_file_call(file_id))

    def file_content(self, file_id: str) -> bytes:
        """A file's bytes (a training file as uploaded, or a job's result CSV)."""
        return self._request(self._file_content_call(file_id))

    def ready(self) -> ReadyStatus:
        """The gateway's readiness, with the workers and fine-tune trainers alive (503 → ServiceUnavailableError)."""
        return self._request(self._ready_call())

    def delete_file(self, file_id: str) -> FileDeleted:
        return self._request(self._delete_file_call(file_id))

    def create_job(self, model: str, training_file: str, method: dict | None = None, *,
                   validation_file: str | None = None, suffix: str | None = None, seed: int | None = None,
                   compression: dict | None = None, hyperparameters: dict | None = None,
                   metadata: dict[str, str] | None = None) -> FineTuningJob:
        """A fine-tune job of base `model` on an uploaded file; `method`: {"type": "lora"|"s2ft"|"medusa", ...}
        or OpenAI's nested form; hyperparameters default to "auto" (resolved from the file's size)."""
        options = {"validation_file": validation_file, "suffix": suffix, "seed": seed, "compression": compression,
                   "hyperparameters": hyperparameters, "metadata": metadata}
        return self._request(self._create_job_call(model, training_file, method, options))

    def list_jobs(self, after: str | None = None, limit: int | None = None) -> FineTuningJobList:
        return self._request(self._list_jobs_call(after, limit))

    def get_job(self, job_id: str) -> FineTuningJob:
        return self._request(self._get_job_call(job_id))

    def cancel_job(self, job_id: str) -> FineTuningJob:
        return self._request(self._cancel_job_call(job_id))

    def list_job_events(self, job_id: str, after: str | None = None,
                        limit: int | None = None) -> FineTuningJobEventList:
        """Newest first; `after` (an event id) pages to older ones."""
        return self._request(self._job_events_call(job_id, after, limit))

    def follow_job(self, job_id: str, after: str | None = None) -> Iterator[FineTuningJobEvent]:
        """Every event oldest first, then new ones as they happen, until the job has finished."""
        return self._stream(self._follow_job_call(job_id, after))

    def list_job_checkpoints(self, job_id: str, after: str | None = None,
                             limit: int | None = None) -> FineTuningJobCheckpointList:
        return self._request(self._job_checkpoints_call(job_id, after, limit))

    # ---- transport ----------------------------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            request = self._http.build_request(call.method, call.path, **call.request_args())
            try:
                response = self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                delay = self._delay(call, attempt, None)
                if delay is None:
                    raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                delay = self._delay(call, attempt, response)
                if delay is None:
                    raise self._error(response)
            time.sleep(delay)
            attempt += 1

    def _request(self, call: Call):
        return self._parse(call, self._send(call))

    def _stream(self, call: Call) -> Iterator:
        response = self._send(call)  # errors before the stream starts raise here, not on first next()
        return self._events(call, response)

    def _events(self, call: Call, response: httpx.Response) -> Iterator:
        try:
            for event in EventSource(response).iter_sse():
                item = self._sse_item(call, event)
                if item is _DONE:
                    return
                if item is not None:
                    yield item
        except SSEError as exc:  # a 200 that is not text/event-stream
            raise self._not_a_stream(response, exc) from exc
        finally:
            response.close()
