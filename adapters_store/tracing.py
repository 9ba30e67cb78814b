"""OpenTelemetry traces for the gateway and the workers, off unless an OTLP endpoint is configured.

On: `--otlp-endpoint URL` (gateway, worker, `serve`), else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
(the full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL; `/v1/traces` is appended). Spans go out in
batches over OTLP/HTTP (protobuf) through the maintained SDK; the standard `OTEL_BSP_*` variables tune the
batching. Off: the API's no-op tracer, so the spans below cost nothing.

One request's spans, one trace across both processes:

    gateway POST /v1/...            (the whole request, stream included; FastAPI adds its own server spans
      gateway.worker_call            around it and its endpoint where its telemetry is on)
                                    (client span; its W3C `traceparent` header goes to the worker)
        worker.generate             (parent taken from the header)
          worker.admission          (prompt encoded, adapter made resident)
          worker.first_token        (queued in the engine, admitted into the batch, prefill, first token)
          worker.decode             (first token → the last)

The `traceparent` header is not part of the cluster signature (which covers method, path, body, time and
nonce): it carries no authority, only which span a worker's spans hang under. Imports no torch."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

TRACES_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
BASE_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_TRACER_NAME = "adapterd"


def traces_url(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: the flag (a base URL) or the standard environment; None → tracing off."""
    env = os.environ if env is None else env
    if flag:
        return flag.rstrip("/") + "/v1/traces"
    if env.get(TRACES_ENV):
        return env[TRACES_ENV]
    if env.get(BASE_ENV):
        return env[BASE_ENV].rstrip("/") + "/v1/traces"
    return None


def configure(service_name: str, url: str | None):
    """Installs the SDK's tracer provider exporting to `url` (returned, to `shutdown()` at exit, which
    flushes); with no url, nothing is installed and the no-op tracer stays."""
    if not url:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER_NAME)


def inject(headers: MutableMapping[str, str], span: trace.Span | None = None) -> None:
    """Adds the W3C `traceparent` (and `tracestate`) of `span` (default: the current one) to `headers`."""
    context = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(headers, context=context)


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from its headers (an empty context when it sent none)."""
    return propagate.extract(headers)


def trace_id(span: trace.Span | None = None) -> str | None:
    """The 32-hex trace id of `span` (default: the current one), None when no trace is recording."""
    ctx = (span or trace.get_current_span()).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class RequestSpans:
    """One request's span and its phases (consecutive child spans), started and ended explicitly: a
    request's async generator runs across tasks, where attaching a context would not hold."""

    def __init__(self, name: str, parent: Context | None, attributes: Mapping[str, str | int]):
        self.root = tracer().start_span(name, context=parent, attributes=attributes)
        self._inside = trace.set_span_in_context(self.root)
        self._phase: trace.Span | None = None

    def phase(self, name: str) -> None:
        """Ends the running phase (if any) and starts `name`."""
        if self._phase is not None:
            self._phase.end()
        self._phase = tracer().start_span(name, context=self._inside)

    def end(self, failed: bool, attributes: Mapping[str, str | int | float]) -> None:
        if self._phase is not None:
            self._phase.end()
        self.root.set_attributes(attributes)
        if failed:
            self.root.set_status(trace.StatusCode.ERROR)
        self.root.end()
