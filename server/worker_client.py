"""HTTP calls from the gateway to workers over one shared, keep-alive connection pool. Transport
failures become `WorkerUnreachableError` (the dispatcher retries those once elsewhere); a worker's error
answer becomes `UpstreamError` carrying its status and error body unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from server.errors import GatewayError, UpstreamError, WorkerUnreachableError

_JSON = {"content-type": "application/json"}


class WorkerTimeoutError(GatewayError):
    status = 504
    type = "server_error"
    code = "worker_timeout"


def _upstream(response: httpx.Response, raw: bytes) -> UpstreamError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return UpstreamError(response.status_code, body)


class WorkerStream:
    """A worker's SSE events as dicts; the first one was already received when this is returned."""

    def __init__(self, response: httpx.Response, first: dict | None, lines: AsyncIterator[str]):
        self._response = response
        self.first = first
        self._lines = lines

    async def __aiter__(self) -> AsyncIterator[dict]:
        if self.first is None:
            return
        yield self.first
        if self.first.get("finish_reason"):
            return
        try:
            async for event in _events(self._lines):
                yield event
                if event.get("finish_reason"):
                    return
        except httpx.TimeoutException as exc:
            raise WorkerTimeoutError(f"worker stalled mid-stream: {exc}") from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachableError(f"worker connection lost mid-stream: {exc}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


def _parse(line: str) -> dict | None:
    """One SSE line → its event, None for framing lines; a worker's error event raises."""
    if not line.startswith("data:"):
        return None
    event = json.loads(line[5:])
    if "error" in event:
        raise UpstreamError(500, event)
    return event


async def _events(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    async for line in lines:
        event = _parse(line)
        if event is not None:
            yield event


class WorkerClient:
    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=read_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def post(self, url: str, path: str, body: bytes) -> dict:
        try:
            response = await self._http.post(url + path, content=body, headers=_JSON)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise WorkerUnreachableError(f"worker {url} did not accept the connection") from exc
            raise WorkerTimeoutError(f"worker {url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachableError(f"worker {url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise _upstream(response, response.content)
        return response.json()

    async def open_stream(self, url: str, body: bytes) -> WorkerStream:
        request = self._http.build_request("POST", url + "/generate", content=body, headers=_JSON)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise WorkerUnreachableError(f"worker {url} did not accept the connection") from exc
        except httpx.TimeoutException as exc:
            raise WorkerTimeoutError(f"worker {url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise WorkerUnreachableError(f"worker {url} unreachable: {exc}") from exc
        try:
            if response.status_code >= 400:
                raise _upstream(response, await response.aread())
            lines = response.aiter_lines()
            first = None
            async for line in lines:
                first = _parse(line)
                if first is not None:
                    break
            return WorkerStream(response, first, lines)
        except httpx.TimeoutException as exc:
            await response.aclose()
            raise WorkerTimeoutError(f"worker {url} did not answer in time") from exc
        except httpx.TransportError as exc:
            await response.aclose()
            raise WorkerUnreachableError(f"worker {url} failed before the first token: {exc}") from exc
        except BaseException:
            await response.aclose()
            raise
