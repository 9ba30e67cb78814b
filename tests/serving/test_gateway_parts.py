"""Small gateway parts: settings and bind safety, the adapter directory, no torch in the gateway."""

import subprocess
import sys

import pytest
from serving_fakes import make_adapter_dir

from server.allowed_folders import AllowList
from server.dropin_adapters import DropInAdapters
from server.settings import GatewaySettings, InsecureBindError


def test_api_keys_parse_to_tenants():
    s = GatewaySettings(api_keys="k1:acme, k2:globex ,k3")
    assert s.tenants_by_key() == {"k1": "acme", "k2": "globex", "k3": "default"}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_without_keys_is_fine(host):
    GatewaySettings(host=host).check_bind_safety()


def test_public_bind_needs_keys_or_the_insecure_flag():
    with pytest.raises(InsecureBindError):
        GatewaySettings(host="0.0.0.0").check_bind_safety()
    GatewaySettings(host="0.0.0.0", api_keys="k:t").check_bind_safety()
    GatewaySettings(host="0.0.0.0", allow_insecure=True).check_bind_safety()


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("ADAPTERD_API_KEYS", "sk:team")
    monkeypatch.setenv("ADAPTERD_QUEUE_MAX", "3")
    s = GatewaySettings()
    assert s.auth_enabled and s.queue_max == 3


def test_catalog_versions(tmp_path):
    for name, version in [("a", None), ("b", "v1"), ("b", "v2"), ("b", "v10"), ("c", "x"), ("c", "y")]:
        make_adapter_dir(tmp_path, name, version)
    (tmp_path / "adapters" / "c" / "LATEST").write_text("x\n")
    cat = DropInAdapters(AllowList([tmp_path / "adapters"]))
    assert cat.resolve("a").ref == "a"
    assert cat.resolve("b").ref == "b@v10"  # natural order
    assert cat.resolve("b@v1").path == tmp_path / "adapters" / "b" / "v1"
    assert cat.resolve("c").ref == "c@x"  # LATEST wins
    for bad in ("b@v3", "nope", "../a", "a/b", "", "a@", ".hidden", "b@../b"):
        assert cat.resolve(bad) is None, bad
    assert [v.ref for v in cat.list()] == ["a", "b@v1", "b@v2", "b@v10", "c@x", "c@y"]


def test_gateway_imports_no_torch_nor_workers():
    code = (
        "import sys, server.app, server.launcher, adapterd_client.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'workers', 'transformers')]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


async def test_lease_released_after_a_registry_refresh(redis_url):
    """A refresh while a request is in flight must not leak its slot (the lease holds the worker's view)."""
    import redis.asyncio as aioredis
    from cluster_signing import cluster_secret

    from adapters_store.cluster_auth import ClusterSigner
    from adapters_store.wire import WORKERS_SET, WorkerInfo, worker_key
    from server.router import WorkerRouter
    from server.worker_registry import WorkerRegistry

    redis = aioredis.from_url(redis_url)
    signer = ClusterSigner(cluster_secret())
    info = WorkerInfo(worker_id="w", url="http://w", model_id="m", capacity=1).signed_by(signer)
    await redis.set(worker_key("w"), info.to_json())
    await redis.sadd(WORKERS_SET, "w")
    registry = WorkerRegistry(redis, refresh_s=60, down_s=5, signer=signer)
    router = WorkerRouter(registry, queue_max=0, queue_timeout_s=0, retry_after_s=1)
    await registry.refresh()
    for _ in range(3):
        lease = await router.acquire(None)
        await registry.refresh()
        lease.release()
        assert registry.get("w").in_flight == 0
    await redis.aclose()


def test_a_worker_record_is_fresh_within_its_signed_ttl_capped_by_the_gateway():
    from adapters_store.wire import RECORD_CLOCK_SKEW_S, WorkerInfo

    info = WorkerInfo(worker_id="w", url="http://w", model_id="m", capacity=1, heartbeat_at=1000.0, ttl_s=5.0)
    assert info.fresh_at(1000.0, 60) and info.fresh_at(1005.0 + RECORD_CLOCK_SKEW_S, 60)
    assert not info.fresh_at(1005.1 + RECORD_CLOCK_SKEW_S, 60)  # past its TTL: a replay
    assert not info.fresh_at(1000.0 - RECORD_CLOCK_SKEW_S - 0.1, 60)  # signed in the future
    long = WorkerInfo(worker_id="w", url="http://w", model_id="m", capacity=1, heartbeat_at=1000.0, ttl_s=3600)
    assert long.fresh_at(1030.0, 30) and not long.fresh_at(1033.0, 30)  # the gateway's cap wins
    unnamed = WorkerInfo(worker_id="w", url="http://w", model_id="m", capacity=1, heartbeat_at=1000.0)
    assert unnamed.fresh_at(1059.0, 60) and not unnamed.fresh_at(1063.0, 60)


def test_sse_events_parse_across_and_within_reads():
    from server.errors import UpstreamError
    from server.worker_client import SseEvents

    def ev(i, finish=None):
        return b'data: {"index":%d,"finish_reason":%s}\n\n' % (i, b'"length"' if finish else b"null")

    parser = SseEvents()
    stream = ev(0) + ev(1) + ev(2, finish=True)
    assert parser.feed(stream[:7]) == []  # half an event: nothing yet
    assert [e["index"] for e in parser.feed(stream[7:40])] == [0]
    assert [e["index"] for e in parser.feed(stream[40:])] == [1, 2]  # several events in one read
    assert parser.finished
    with pytest.raises(UpstreamError):
        SseEvents().feed(b'data: {"error":{"type":"server_error","message":"boom"}}\n\n')
