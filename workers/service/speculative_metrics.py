"""The worker's Prometheus metrics for Medusa speculative decoding, per adapter ("" = the base's default
heads): decode steps, tokens emitted by them, and each head's acceptance rate; read from the engine's
counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SpeculativeCollector(Collector):
    def __init__(self, medusa_stats: Callable[[], dict]):
        self._stats = medusa_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        steps = CounterMetricFamily("adapterd_worker_medusa_steps", "Tree-verification decode steps",
                                    labels=["adapter"])
        tokens = CounterMetricFamily("adapterd_worker_medusa_tokens", "Tokens emitted by tree-verification steps",
                                     labels=["adapter"])
        mean = GaugeMetricFamily("adapterd_worker_medusa_tokens_per_step", "Mean tokens per verification step",
                                 labels=["adapter"])
        accept = GaugeMetricFamily("adapterd_worker_medusa_head_acceptance",
                                   "Share of steps that accepted head i's candidate (depth i+1)",
                                   labels=["adapter", "head"])
        for adapter, s in sorted(stats.items()):
            steps.add_metric([adapter], s["steps"])
            tokens.add_metric([adapter], s["tokens"])
            mean.add_metric([adapter], s["mean_tokens_per_step"])
            for head, rate in enumerate(s["acceptance_by_head"]):
                accept.add_metric([adapter, str(head)], rate)
        yield from (steps, tokens, mean, accept)
