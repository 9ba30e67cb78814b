"""Prometheus metrics of the gateway (own registry per app): requests, tokens, latency and
time-to-first-token per adapter and per worker, retries, queue depth, live workers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("adapter", "worker")
        self.requests = Counter(
            "adapterd_requests",
            "Requests a worker served, by outcome",
            (*labels, "outcome"),
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "adapterd_prompt_tokens", "Prompt tokens", labels, registry=self.registry
        )
        self.completion_tokens = Counter(
            "adapterd_completion_tokens", "Generated tokens", labels, registry=self.registry
        )
        self.latency = Histogram(
            "adapterd_request_latency_seconds",
            "Request latency through the gateway",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "adapterd_time_to_first_token_seconds",
            "Time to the first streamed token",
            labels,
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "adapterd_worker_retries",
            "Requests retried after a worker failed",
            ("worker",),
            registry=self.registry,
        )
        self.rejected = Counter(
            "adapterd_rejected_requests",
            "Requests refused before reaching a worker",
            ("code",),
            registry=self.registry,
        )
        self.responses = Counter(
            "adapterd_http_responses",
            "Every response the gateway sent, by route template and status",
            ("route", "status"),
            registry=self.registry,
        )
        self.workers_alive = Gauge(
            "adapterd_workers_alive", "Workers currently routable", registry=self.registry
        )
        self.queue_waiting = Gauge(
            "adapterd_queue_waiting", "Requests waiting for a free worker slot", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
