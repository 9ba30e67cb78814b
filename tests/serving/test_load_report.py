"""The load a worker announces on each heartbeat (`WorkerInfo.stats`, workers.service.load_report): tokens/s over a
sliding window, queue, fusion state, Medusa acceptance, device-resident adapters; and the payload round trip."""

import httpx
from cluster_signing import ClusterAuth, cluster_secret
from serving_fakes import FakeEngine

from adapters_store.wire import WorkerInfo
from workers.service.app import create_app
from workers.service.config import WorkerServiceConfig
from workers.service.load_report import TokenRate, load_report


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_rate_counts_a_sliding_window():
    clock = Clock()
    rate = TokenRate(window_s=5, clock=clock)
    assert rate.per_second() == 0
    rate.add(10)
    clock.now += 1
    rate.add(5)
    assert rate.per_second() == 3.0  # 15 tokens / 5 s
    clock.now += 4.5  # the first second's bucket has left the window
    assert rate.per_second() == 1.0
    clock.now += 10
    assert rate.per_second() == 0


def test_load_report_from_engine_stats():
    stats = {"running": 3, "waiting": 2, "max_batch": 8,
             "adapters": {"device_names": ["a@1"], "host_adapters": 2},
             "fusion": {"fused_adapter": "a@1", "fusions": 1, "unfusions": 0, "fused_seconds": 2.0},
             "medusa": {"": {"steps": 4, "tokens": 9, "mean_tokens_per_step": 2.25,
                             "acceptance_by_head": [0.75, 0.5, 0.0]}}}
    report = load_report(stats, 12.345)
    assert report == {"tokens_per_s": 12.35, "running": 3, "queue": 2,
                      "fusion": {"fused_adapter": "a@1", "fusions": 1, "unfusions": 0},
                      "medusa": {"base": {"steps": 4, "mean_tokens_per_step": 2.25,
                                          "acceptance_by_head": [0.75, 0.5, 0.0]}},
                      "device_adapters": ["a@1"]}
    idle = load_report({}, 0.0)
    assert idle["queue"] == 0 and idle["fusion"]["fused_adapter"] is None and idle["medusa"] == {}


async def test_the_heartbeat_payload_carries_tokens_per_second():
    app = create_app(FakeEngine(), WorkerServiceConfig(worker_id="w1", cluster_secret=cluster_secret()))
    service = app.state.service
    assert service.info().stats["tokens_per_s"] == 0
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://w1", auth=ClusterAuth()) as c:
        r = await c.post("/generate", json={"prompt": "hi", "params": {"max_tokens": 5}})
        assert r.status_code == 200
    info = WorkerInfo.from_json(service.info().to_json())  # what the gateway reads back from Redis
    assert info.stats["tokens_per_s"] == 1.0  # 5 tokens over the 5 s window
    assert info.stats["queue"] == 0 and info.stats["running"] == 0
