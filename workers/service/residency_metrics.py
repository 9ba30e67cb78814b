"""The worker's Prometheus metrics: adapter residency (loads, hits, misses, evictions, load time, bytes)
and fusion (events, time fused, the fused adapter), read from the engine's counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

EVENTS = ("host_loads", "host_evictions", "device_hits", "device_misses", "device_evictions")


class ResidencyCollector(Collector):
    def __init__(self, adapter_stats: Callable[[], dict]):
        self._stats = adapter_stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        events = CounterMetricFamily("adapterd_worker_adapter_events", "Adapter residency events by kind",
                                     labels=["event"])
        for event in EVENTS:
            events.add_metric([event], s.get(event, 0))
        yield events
        yield CounterMetricFamily("adapterd_worker_adapter_device_load_seconds",
                                  "Time spent decoding and writing adapters onto the device",
                                  value=s.get("device_load_us", 0) / 1e6)
        sizes = GaugeMetricFamily("adapterd_worker_adapter_bytes", "Adapter bytes held per tier", labels=["tier"])
        sizes.add_metric(["host"], s.get("host_bytes", 0))
        sizes.add_metric(["host_budget"], s.get("host_budget_bytes", 0))
        sizes.add_metric(["device_s2ft"], s.get("device_s2ft_bytes", 0))
        yield sizes
        counts = GaugeMetricFamily("adapterd_worker_adapters", "Adapters resident per tier", labels=["tier"])
        counts.add_metric(["host"], s.get("host_adapters", 0))
        counts.add_metric(["device"], s.get("device_adapters", 0))
        yield counts
        yield GaugeMetricFamily("adapterd_worker_lora_free_rows", "Free LoRA rank rows on the device",
                                value=s.get("device_free_rows", 0))


class FusionCollector(Collector):
    def __init__(self, fusion_stats: Callable[[], dict]):
        self._stats = fusion_stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        events = CounterMetricFamily("adapterd_worker_fusion_events", "Adapters fused into / unfused from the base",
                                     labels=["event"])
        events.add_metric(["fuse"], s.get("fusions", 0))
        events.add_metric(["unfuse"], s.get("unfusions", 0))
        events.add_metric(["skipped_no_room"], s.get("fusion_skipped_no_room", 0))
        yield events
        yield CounterMetricFamily("adapterd_worker_fused_seconds", "Time an adapter was fused into the base",
                                  value=s.get("fused_seconds", 0.0))
        yield CounterMetricFamily("adapterd_worker_fusion_work_seconds", "Time spent fusing and unfusing",
                                  value=s.get("fusion_seconds", 0.0))
        fused = GaugeMetricFamily("adapterd_worker_fused_adapter", "1 for the adapter fused into the base now",
                                  labels=["adapter"])
        if s.get("fused_adapter"):
            fused.add_metric([s["fused_adapter"]], 1)
        yield fused


def residency_registry(adapter_stats: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ResidencyCollector(adapter_stats))
    return registry
