"""What the sync and async clients share: configuration, request building for every API call, retry
decisions with backoff, error mapping and SSE parsing. The two clients differ only in transport."""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, SSEError
from pydantic import BaseModel

from adapterd_client.errors import APIStatusError, StreamError, error_from
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

RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_URL = "http://127.0.0.1:8000"
_DONE = object()


@dataclass(frozen=True)
class Call:
    """One API call: what to send and how to read the answer."""

    method: str
    path: str
    model: type[BaseModel] | None  # None → the raw response bytes
    body: dict | None = None
    stream: bool = False
    retry_safe: bool = True  # inference and reads change nothing on the server: safe to repeat
    params: dict = field(default_factory=dict)
    files: list[tuple[str, tuple[str, Any]]] | None = None  # multipart parts
    form: dict[str, str] | None = None  # multipart fields

    def request_args(self) -> dict[str, Any]:
        if self.files is not None:
            return {"files": self.files, "data": self.form or {}}
        return {"json": self.body, "params": self.params or None}


class ProgressReader(io.RawIOBase):
    """Wraps bytes being uploaded; calls `progress(n)` as httpx reads each chunk."""

    def __init__(self, data: bytes, progress: Callable[[int], None] | None):
        self._buf = io.BytesIO(data)
        self._progress = progress

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._buf.read(size)
        if self._progress is not None and chunk:
            self._progress(len(chunk))
        return chunk


def upload_parts(paths: list[str | Path], progress: Callable[[int], None] | None) -> list[tuple[str, tuple]]:
    """The multipart parts for a PEFT folder (its files), an archive, or a .safetensors + config JSON."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [("files", (p.name, ProgressReader(p.read_bytes(), progress))) for p in files]


def upload_size(paths: list[str | Path]) -> int:
    total = 0
    for path in map(Path, paths):
        total += sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    return total


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


class BaseClient:
    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ):
        self.base_url = (base_url or os.environ.get("ADAPTERD_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("ADAPTERD_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def _headers(self) -> dict[str, str]:
        headers = {"user-agent": "adapterd-client/0.1"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    # ---- calls --------------------------------------------------------------------------------

    @staticmethod
    def _completions_call(model: str, prompt: str | list, stream: bool, params: dict) -> Call:
        body = {"model": model, "prompt": prompt, "stream": stream, **_clean(params)}
        return Call("POST", "/v1/completions", Completion, body, stream)

    @staticmethod
    def _chat_call(model: str, messages: list[dict], stream: bool, params: dict) -> Call:
        body = {"model": model, "messages": messages, "stream": stream, **_clean(params)}
        return Call("POST", "/v1/chat/completions", ChatCompletionChunk if stream else ChatCompletion, body, stream)

    @staticmethod
    def _models_call() -> Call:
        return Call("GET", "/v1/models", ModelList)

    @staticmethod
    def _generate_call(inputs: str, adapter_id: str | None, stream: bool, params: dict) -> Call:
        body = {"inputs": inputs, "parameters": _clean({"adapter_id": adapter_id, **params})}
        if stream:
            return Call("POST", "/generate_stream", StreamResponse, body, True)
        return Call("POST", "/generate", GenerateResponse, body)

    @staticmethod
    def _upload_adapter_call(name: str, paths: list[str | Path], kind: str | None, compression: dict | None,
                             public: bool, progress: Callable[[int], None] | None) -> Call:
        form = {"name": name, "public": "true" if public else "false"}
        if kind:
            form["kind"] = kind
        if compression:
            form["compression"] = json.dumps(compression)
        return Call("POST", "/v1/adapters", AdapterInfo, retry_safe=False,
                    files=upload_parts(paths, progress), form=form)

    @staticmethod
    def _list_adapters_call() -> Call:
        return Call("GET", "/v1/adapters", AdapterList)

    @staticmethod
    def _get_adapter_call(name: str) -> Call:
        return Call("GET", f"/v1/adapters/{name}", AdapterInfo)

    @staticmethod
    def _delete_adapter_call(ref: str) -> Call:
        return Call("DELETE", f"/v1/adapters/{ref}", AdapterDeleted, retry_safe=False)

    @staticmethod
    def _download_adapter_call(ref: str) -> Call:
        return Call("GET", f"/v1/adapters/{ref}/download", None)

    @staticmethod
    def _save_merge_call(name: str, merged_adapters: dict, public: bool) -> Call:
        body = {"name": name, "merged_adapters": merged_adapters, "public": public}
        return Call("POST", "/v1/adapters/merge", AdapterInfo, body, retry_safe=False)

    # ---- fine-tune files and jobs -------------------------------------------------------------

    @staticmethod
    def _upload_file_call(path: str | Path, purpose: str, progress: Callable[[int], None] | None) -> Call:
        path = Path(path)
        part = ("file", (path.name, ProgressReader(path.read_bytes(), progress)))
        return Call("POST", "/v1/files", FileObject, retry_safe=False, files=[part], form={"purpose": purpose})

    @staticmethod
    def _list_files_call(purpose: str | None) -> Call:
        return Call("GET", "/v1/files", FileList, params=_clean({"purpose": purpose}))

    @staticmethod
    def _get_file_call(file_id: str) -> Call:
        return Call("GET", f"/v1/files/{file_id}", FileObject)

    @staticmethod
    def _file_content_call(file_id: str) -> Call:
        return Call("GET", f"/v1/files/{file_id}/content", None)

    @staticmethod
    def _ready_call() -> Call:
        return Call("GET", "/ready", ReadyStatus)

    @staticmethod
    def _delete_file_call(file_id: str) -> Call:
        return Call("DELETE", f"/v1/files/{file_id}", FileDeleted, retry_safe=False)

    @staticmethod
    def _create_job_call(model: str, training_file: str, method: dict | None, options: dict) -> Call:
        body = {"model": model, "training_file": training_file, **_clean({"method": method, **options})}
        return Call("POST", "/v1/fine_tuning/jobs", FineTuningJob, body, retry_safe=False)

    @staticmethod
    def _list_jobs_call(after: str | None, limit: int | None) -> Call:
        return Call("GET", "/v1/fine_tuning/jobs", FineTuningJobList, params=_clean({"after": after, "limit": limit}))

    @staticmethod
    def _get_job_call(job_id: str) -> Call:
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}", FineTuningJob)

    @staticmethod
    def _cancel_job_call(job_id: str) -> Call:
        return Call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", FineTuningJob, retry_safe=False)

    @staticmethod
    def _job_events_call(job_id: str, after: str | None, limit: int | None) -> Call:
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", FineTuningJobEventList,
                    params=_clean({"after": after, "limit": limit}))

    @staticmethod
    def _follow_job_call(job_id: str, after: str | None) -> Call:
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}/events", FineTuningJobEvent, stream=True,
                    params=_clean({"stream": "true", "after": after}))

    @staticmethod
    def _job_checkpoints_call(job_id: str, after: str | None, limit: int | None) -> Call:
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", FineTuningJobCheckpointList,
                    params=_clean({"after": after, "limit": limit}))

    # ---- retries and errors -------------------------------------------------------------------

    def _delay(self, call: Call, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retrying, or None if this failure is final."""
        if not call.retry_safe or attempt >= self.max_retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        hinted = _retry_after(response)
        return min(self.max_backoff_s, max(backoff, hinted or 0.0))

    @staticmethod
    def _error(response: httpx.Response) -> APIStatusError:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"message": response.text[:500]}}
        return error_from(response.status_code, body, _retry_after(response))

    @staticmethod
    def _parse(call: Call, response: httpx.Response) -> BaseModel | bytes:
        if call.model is None:
            return response.content
        return call.model.model_validate_json(response.content)

    @staticmethod
    def _sse_item(call: Call, event: ServerSentEvent) -> Any:
        """One SSE event (parsed by httpx-sse) → a model, `_DONE` at `[DONE]`, None for an event without data;
        error events raise."""
        if not event.data:
            return None
        if event.data == "[DONE]":
            return _DONE
        payload = json.loads(event.data)
        if "error" in payload:
            raise error_from(500, payload, cls=StreamError)
        return call.model.model_validate(payload)

    @staticmethod
    def _not_a_stream(response: httpx.Response, exc: SSEError) -> APIStatusError:
        return error_from(response.status_code, {"error": {"message": str(exc)}}, cls=StreamError)


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
