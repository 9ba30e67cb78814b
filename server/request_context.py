"""Per-request context at the gateway's edge (a plain ASGI middleware, outermost): accepts the caller's
`X-Request-ID` or makes one, returns it on every response, counts every response by route and status
(`adapterd_http_responses_total`), and writes one JSON log line per request with what the handlers noted
on the way (tenant, adapter, worker, tokens, time to first token). The id reaches the worker in the
request payload, so the worker's log lines carry it too. With tracing on (`adapters_store.tracing`) each
request is one span (under FastAPI's own server span, where FastAPI makes one), the current span while the
handlers run (worker calls hang under it), and the
log line carries its `trace_id`."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store import tracing
from adapters_store.json_logging import REQUEST_ID, accept_request_id
from server.metrics import GatewayMetrics

log = logging.getLogger("adapterd.access")
_FIELDS: ContextVar[dict | None] = ContextVar("adapterd_request_fields", default=None)


def note(**fields) -> None:
    """Adds fields to the current request's log line (no-op outside a request)."""
    current = _FIELDS.get()
    if current is not None:
        current.update(fields)


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        rid = accept_request_id(given.decode("latin-1") if given else None)
        fields: dict = {}
        id_token, fields_token = REQUEST_ID.set(rid), _FIELDS.set(fields)
        status, start = 500, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        span_cm = tracing.tracer().start_as_current_span(f"gateway {scope['method']}", kind=SpanKind.INTERNAL,
                                                         attributes={"adapterd.request_id": rid})
        with span_cm as span:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.responses.labels(route, str(status)).inc()
                _end_span(span, scope["method"], route, status, fields)
                log.info("request", extra={"request_id": rid, "method": scope["method"], "path": scope["path"],
                                           "status": status, "latency_s": round(time.perf_counter() - start, 6),
                                           "trace_id": tracing.trace_id(span), **fields})
                REQUEST_ID.reset(id_token)
                _FIELDS.reset(fields_token)


def _end_span(span, method: str, route: str, status: int, fields: dict) -> None:
    """The request span's name and attributes, known only once the route ran."""
    if not span.is_recording():
        return
    span.update_name(f"gateway {method} {route}")
    span.set_attributes({"http.request.method": method, "http.route": route, "http.response.status_code": status,
                         **{f"adapterd.{k}": v for k, v in fields.items() if isinstance(v, str | int | float)}})
    if status >= 500:
        span.set_status(StatusCode.ERROR)
