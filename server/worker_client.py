"""HTTP calls from the gateway to workers (aiohttp, one shared keep-alive connection pool); the only
module that speaks to workers. Transport failures become `WorkerUnreachableError` (the dispatcher retries
those once elsewhere); a worker's error answer becomes `UpstreamError` carrying its status and error body
unchanged. Streams are read as raw SSE bytes and handed on in batches: every event one socket read
brought, so a gateway that falls behind catches up by forwarding several tokens per write. Every request is
signed with the cluster secret (`adapters_store.cluster_auth`): workers refuse anything else. Each call is
a client span (`gateway.worker_call`, ended when the answer or the stream is done) whose W3C `traceparent`
header travels beside the signature headers (`adapters_store.tracing`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import orjson
from opentelemetry.trace import Span, SpanKind, StatusCode
from yarl import URL

from adapters_store import event_stream, tracing
from adapters_store.cluster_auth import ClusterSigner
from server.errors import GatewayError, UpstreamError, WorkerUnreachableError

_JSON = {"content-type": "application/json"}
KEEPALIVE_S = 30.0  # below the workers' keep-alive (service.KEEP_ALIVE_S): the gateway closes idle ones first


class WorkerTimeoutError(GatewayError):
    status = 504
    type = "server_error"
    code = "worker_timeout"


@contextmanager
def _translated(url: str, when: str) -> Iterator[None]:
    """aiohttp's failures → the gateway's: not accepting → unreachable, silent → timeout, cut → unreachable."""
    try:
        yield
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise WorkerUnreachableError(f"worker {url} did not accept the connection") from exc
    except TimeoutError as exc:
        raise WorkerTimeoutError(f"worker {url} did not answer in time {when}") from exc
    except aiohttp.ClientError as exc:
        raise WorkerUnreachableError(f"worker {url} connection lost {when}: {exc!r}") from exc


def _upstream(status: int, raw: bytes) -> UpstreamError:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = {}
    return UpstreamError(status, body)


class SseEvents:
    """A worker's stream read incrementally: its `data: {json}` events (`adapters_store.event_stream`, the
    format the worker writes) as dicts, until every choice has finished."""

    def __init__(self, choices: int = 1) -> None:
        self._buffer = b""
        self._unfinished = choices  # a request for n completions ends after n finish events
        self.finished = False  # every choice's event with a finish_reason was seen

    def feed(self, chunk: bytes) -> list[dict]:
        payloads, self._buffer = event_stream.split_events(self._buffer + chunk)
        events = []
        for payload in payloads:
            event = orjson.loads(payload)
            if "error" in event:
                raise UpstreamError(500, event)
            events.append(event)
            if event.get("finish_reason"):
                self._unfinished -= 1
                if self._unfinished <= 0:
                    self.finished = True
                    break
        return events


class WorkerStream:
    """A worker's token events in batches (lists of dicts); the first batch was received before this
    was returned, so failures up to the first token surface from `open_stream`."""

    def __init__(self, url: str, response: aiohttp.ClientResponse, parser: SseEvents, first: list[dict],
                 span: Span):
        self._url = url
        self._response = response
        self._parser = parser
        self.first = first
        self._span = span

    async def __aiter__(self) -> AsyncIterator[list[dict]]:
        if not self.first:
            return
        yield self.first
        with _translated(self._url, "mid-stream"):
            while not self._parser.finished:
                chunk = await self._response.content.readany()
                if not chunk:
                    return
                batch = self._parser.feed(chunk)
                if batch:
                    yield batch

    async def aclose(self) -> None:
        """Finished: read the stream's end so the connection goes back to the pool; else cut it (the
        worker sees the client go away and cancels the generation)."""
        self._span.end()
        if self._parser.finished:
            try:
                await self._response.read()
                self._response.release()
                return
            except (aiohttp.ClientError, TimeoutError):
                pass
        self._response.close()


class WorkerClient:
    def __init__(self, connect_timeout_s: float, read_timeout_s: float, max_connections: int,
                 signer: ClusterSigner):
        self._signer = signer
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s),
            skip_auto_headers=("User-Agent",),
            auto_decompress=False,
        )

    async def aclose(self) -> None:
        await self._http.close()

    def _headers(self, target: str, body: bytes, span: Span) -> dict[str, str]:
        headers = {**_JSON, **self._signer.request_headers("POST", URL(target).raw_path_qs, body)}
        tracing.inject(headers, span)  # beside the signature, which does not cover it
        return headers

    @staticmethod
    def _span(url: str, path: str) -> Span:
        return tracing.tracer().start_span("gateway.worker_call", kind=SpanKind.CLIENT,
                                           attributes={"server.address": url, "url.path": path})

    async def post(self, url: str, path: str, body: bytes) -> dict:
        span = self._span(url, path)
        with _ending(span), _translated(url, "to a request"):
            headers = self._headers(url + path, body, span)
            async with self._http.post(url + path, data=body, headers=headers) as response:
                raw = await response.read()
            span.set_attribute("http.response.status_code", response.status)
        if response.status >= 400:
            raise _upstream(response.status, raw)
        return orjson.loads(raw)

    async def open_stream(self, url: str, body: bytes, choices: int = 1) -> WorkerStream:
        span = self._span(url, "/generate")
        try:
            with _translated(url, "before the first token"):
                target = url + "/generate"
                response = await self._http.post(target, data=body, headers=self._headers(target, body, span))
        except BaseException:
            _end_failed(span)
            raise
        try:
            with _translated(url, "before the first token"):
                if response.status >= 400:
                    raise _upstream(response.status, await response.read())
                parser, first = SseEvents(choices), []
                while not first:
                    chunk = await response.content.readany()
                    if not chunk:
                        break
                    first = parser.feed(chunk)
            return WorkerStream(url, response, parser, first, span)
        except BaseException:
            response.close()
            _end_failed(span)
            raise


def _end_failed(span: Span) -> None:
    span.set_status(StatusCode.ERROR)
    span.end()


@contextmanager
def _ending(span: Span) -> Iterator[None]:
    """Ends `span` on the way out, marked failed when an exception passes."""
    try:
        yield
    except BaseException:
        span.set_status(StatusCode.ERROR)
        raise
    finally:
        span.end()
