"""Attacks from a local process that is not a cluster member, against real processes: a worker and a gateway
on a password-protected embedded Redis (as `adapterd serve` runs it). Such a process knows the worker's
address and may speak to Redis's port, but holds neither the cluster secret nor the Redis password."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
from cluster_signing import cluster_secret
from serving_cluster import Cluster, ready_workers, start_gateway, start_worker, wait_until
from tls_proxy import TlsProxy, write_self_signed

from adapters_store.cluster_auth import ClusterSigner
from adapters_store.wire import WORKERS_SET, WorkerInfo, worker_key
from server.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.timeout(180)
ADMIN = {"Authorization": "Bearer admin-key"}
TENANT = {"Authorization": "Bearer tenant-key"}
WORKER_ROUTES = [
    ("POST", "/generate", {"prompt": "hi", "params": {"max_tokens": 2}}),
    ("POST", "/adapters/load", {"name": "x", "path": "/tmp"}),
    ("POST", "/adapters/unload", {"name": "x"}),
    ("GET", "/stats", None),
    ("GET", "/metrics", None),
]


@pytest.fixture(scope="module")
def protected_redis(tmp_path_factory):
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis-data"))
    url = embedded.start()
    yield url
    embedded.stop()


@pytest.fixture(scope="module")
def tls_redis(protected_redis, tmp_path_factory):
    """The same Redis behind TLS (as stunnel would put it): a `rediss://` URL with the password."""
    cert, key = write_self_signed(tmp_path_factory.mktemp("tls"))
    proxy = TlsProxy(int(protected_redis.rsplit(":", 1)[1]), cert, key).start()
    password = protected_redis.split("@")[0].rsplit(":", 1)[1]
    yield proxy, f"rediss://:{password}@127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
    proxy.stop()


@pytest.fixture(scope="module")
def cluster(security_assets, tls_redis, tmp_path_factory):
    """A worker and a gateway that reach Redis only through TLS, with the password."""
    model, data = security_assets
    _, url = tls_redis
    logs = tmp_path_factory.mktemp("logs")
    worker = start_worker("real", model, url, logs, data_dir=data)
    gateway = start_gateway(url, data, logs, ADAPTERD_ADMIN_KEYS="admin-key",
                            ADAPTERD_API_KEYS="tenant-key:tenant-a", ADAPTERD_BASE_MODEL_PATH=str(model))
    c = Cluster(gateway, [worker], data, url, logs)
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1, 90, "the worker", [gateway, worker])
        yield c
    finally:
        c.stop()


def worker_url(cluster) -> str:
    return cluster.workers[0].url


@pytest.mark.parametrize(("method", "path", "body"), WORKER_ROUTES, ids=[r[1] for r in WORKER_ROUTES])
def test_worker_refuses_unsigned_and_foreign_signed(cluster, method, path, body):
    url = worker_url(cluster) + path
    r = httpx.request(method, url, json=body, timeout=10)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "cluster_auth_required"
    raw = json.dumps(body).encode() if body is not None else b""
    forged = ClusterSigner(b"not-the-cluster-secret-0123456789").request_headers(method, path, raw)
    r = httpx.request(method, url, content=raw, headers={**forged, "content-type": "application/json"}, timeout=10)
    assert r.status_code == 401, r.text


def test_worker_health_stays_open(cluster):
    assert httpx.get(worker_url(cluster) + "/health", timeout=10).status_code == 200


def test_signed_request_works_once(cluster):
    """A member's signed request is served; the same bytes sent again (a replay) are refused, as is a request
    signed outside the 60 s window and one whose body was changed after signing."""
    signer = ClusterSigner(cluster_secret())
    headers = signer.request_headers("GET", "/stats")
    assert httpx.get(worker_url(cluster) + "/stats", headers=headers, timeout=10).status_code == 200
    replay = httpx.get(worker_url(cluster) + "/stats", headers=headers, timeout=10)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    stale = signer.request_headers("GET", "/stats", signed_at=time.time() - 120)
    assert httpx.get(worker_url(cluster) + "/stats", headers=stale, timeout=10).status_code == 401
    body = json.dumps({"prompt": "hi", "params": {"max_tokens": 2}}).encode()
    signed = signer.request_headers("POST", "/generate", body)
    tampered = body.replace(b"2}", b"3}")
    r = httpx.post(worker_url(cluster) + "/generate", content=tampered,
                   headers={**signed, "content-type": "application/json"}, timeout=10)
    assert r.status_code == 401


def test_cluster_runs_over_rediss(cluster, tls_redis):
    """The worker and the gateway registered and routed through the TLS port; plain text there is refused."""
    proxy, url = tls_redis
    assert proxy.connections >= 2
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=proxy.port, socket_timeout=5).ping()
    assert redis.Redis.from_url(url).sismember(WORKERS_SET, "real")


def test_redis_needs_the_password(cluster, protected_redis):
    """Without the password nothing is readable or writable; with a wrong one neither."""
    host_port = protected_redis.rsplit("@", 1)[1]
    for client in (redis.Redis.from_url(f"redis://{host_port}"),
                   redis.Redis.from_url(f"redis://:wrong-password@{host_port}")):
        for attempt in (lambda c: c.keys("*"), lambda c: c.smembers(WORKERS_SET),
                        lambda c: c.get(worker_key("real")), lambda c: c.set("x", "1")):
            with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
                attempt(client)
    assert redis.Redis.from_url(protected_redis).sismember(WORKERS_SET, "real")


class _FakeWorker(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.received.append(self.rfile.read(int(self.headers.get("content-length", 0))).decode())
        out = json.dumps({"text": "stolen", "token_ids": [1], "tokens": ["stolen"], "prompt_tokens": 1,
                          "completion_tokens": 1, "finish_reason": "length", "worker_id": "fake"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def test_fake_worker_in_redis_gets_no_traffic(cluster, protected_redis):
    """Even with the Redis password (e.g. a leaked one), a worker record not signed with the cluster secret is
    never routed to: neither unsigned nor signed with another secret, however idle it claims to be."""
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _FakeWorker)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    r = redis.Redis.from_url(protected_redis)
    base = httpx.get(cluster.url + "/ready", timeout=10).json()["model"]
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        unsigned = WorkerInfo(worker_id="fake-unsigned", url=url, model_id=base, capacity=1000)
        forged = WorkerInfo(worker_id="fake-forged", url=url, model_id=base, capacity=1000).signed_by(
            ClusterSigner(b"not-the-cluster-secret-0123456789"))
        for info in (unsigned, forged):
            r.set(worker_key(info.worker_id), info.to_json(), ex=120)
            r.sadd(WORKERS_SET, info.worker_id)
        log = cluster.gateway.log
        wait_until(lambda: all(f"ignoring worker record '{w}'" in log.read_text() for w in ("fake-unsigned",
                                                                                          "fake-forged")),
                   30, "the gateway to read the fake records")
        for _ in range(10):
            out = httpx.post(cluster.url + "/v1/completions", headers=TENANT, timeout=30,
                             json={"model": base, "prompt": "secret prompt", "max_tokens": 2})
            assert out.status_code == 200, out.text
            assert out.json()["choices"][0]["text"] != "stolen"
        assert _FakeWorker.received == []
        listed = httpx.get(cluster.url + "/v1/workers", headers=ADMIN, timeout=10).json()["data"]
        assert [w["worker_id"] for w in listed] == ["real"]
    finally:
        fake.shutdown()
        for worker_id in ("fake-unsigned", "fake-forged"):
            r.delete(worker_key(worker_id))
            r.srem(WORKERS_SET, worker_id)


def test_replayed_old_worker_record_gets_no_traffic(cluster, protected_redis):
    """A record signed with the cluster secret but captured long ago (its signed heartbeat time is past its
    TTL), written back to Redis by a process that took over the old worker's port, gets no traffic; the same
    record signed just now is listed (so the test sees the difference)."""
    fake = ThreadingHTTPServer(("127.0.0.1", 0), _FakeWorker)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    r = redis.Redis.from_url(protected_redis)
    base = httpx.get(cluster.url + "/ready", timeout=10).json()["model"]
    signer = ClusterSigner(cluster_secret())
    url = f"http://127.0.0.1:{fake.server_address[1]}"

    def record(worker_id: str, heartbeat_at: float) -> WorkerInfo:
        return WorkerInfo(worker_id=worker_id, url=url, model_id=base, capacity=1000, ttl_s=5.0,
                          heartbeat_at=heartbeat_at).signed_by(signer)

    def listed() -> list[str]:
        data = httpx.get(cluster.url + "/v1/workers", headers=ADMIN, timeout=10).json()["data"]
        return sorted(w["worker_id"] for w in data)

    try:
        for info in (record("replayed", time.time() - 600), record("current", time.time())):
            r.set(worker_key(info.worker_id), info.to_json(), ex=120)
            r.sadd(WORKERS_SET, info.worker_id)
        wait_until(lambda: "current" in listed(), 30, "the gateway to read the records")
        assert listed() == ["current", "real"]
        stale = "ignoring worker record 'replayed': its signed heartbeat time is stale"
        assert stale in cluster.gateway.log.read_text()
        r.delete(worker_key("current"))
        wait_until(lambda: listed() == ["real"], 30, "the fresh record to go")
        _FakeWorker.received.clear()
        for _ in range(10):
            out = httpx.post(cluster.url + "/v1/completions", headers=TENANT, timeout=30,
                             json={"model": base, "prompt": "secret prompt", "max_tokens": 2})
            assert out.status_code == 200 and out.json()["choices"][0]["text"] != "stolen", out.text
        assert _FakeWorker.received == []
    finally:
        fake.shutdown()
        for worker_id in ("replayed", "current"):
            r.delete(worker_key(worker_id))
            r.srem(WORKERS_SET, worker_id)


@pytest.mark.parametrize("source", [
    "/etc",  # a folder
    "{data}/adapters/../../model",  # a path that climbs out
    "file:///tmp/adapterd-attack-store#x@1",  # another store (a file:// store would create its folder)
    "s3://bucket/p?endpoint_url=http://127.0.0.1:1#x@1",  # an S3 endpoint of the caller's choice
    "dropin:../model",  # a drop-in name that climbs out
    "store:x",  # not pinned to a version
])
def test_worker_takes_no_paths_or_urls(cluster, tmp_path_factory, source):
    """Even a signed request (the gateway's) cannot name a path, another store or an endpoint: the worker
    refuses it with a 4xx that repeats no path, and creates nothing."""
    source = source.format(data=cluster.data_dir)
    signer = ClusterSigner(cluster_secret())
    for path, body in (("/adapters/load", {"name": "evil", "path": source}),
                       ("/generate", {"prompt": "hi", "adapter": "evil", "adapter_path": source}),
                       ("/generate", {"prompt": "hi", "medusa_path": source})):
        raw = json.dumps(body).encode()
        headers = {**signer.request_headers("POST", path, raw), "content-type": "application/json"}
        r = httpx.post(worker_url(cluster) + path, content=raw, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, r.text
        assert str(cluster.data_dir) not in r.text and "/etc" not in r.text and "/tmp" not in r.text
    assert not Path("/tmp/adapterd-attack-store").exists()


def test_drop_in_adapter_still_serves(cluster):
    """The operator's drop-in folder keeps working: a folder put into DATA_DIR/adapters serves at once, by its
    bare name, imported into the store as the operator's public `admin/dropped` (what the worker loads)."""
    from serving_assets import build_lora

    build_lora(cluster.data_dir.parent / "model", cluster.data_dir / "adapters" / "dropped", seed=5)
    r = httpx.post(cluster.url + "/v1/completions", headers=TENANT, timeout=60,
                   json={"model": "dropped", "prompt": "hello", "max_tokens": 3})
    assert r.status_code == 200, r.text
    info = httpx.get(cluster.url + "/v1/adapters/admin/dropped", headers=TENANT, timeout=30).json()
    assert info["owner"] == "admin" and info["public"] and info["latest"] == 1

    def resident() -> list[str]:
        return httpx.get(cluster.url + "/v1/workers", headers=ADMIN, timeout=10).json()["data"][0]["resident_adapters"]
    wait_until(lambda: "admin/dropped@1" in resident(), 30, "the worker's heartbeat to show the stored version")
    raw = json.dumps({"name": "direct", "path": "dropin:dropped"}).encode()  # the folder itself: refused
    headers = {**ClusterSigner(cluster_secret()).request_headers("POST", "/adapters/load", raw),
               "content-type": "application/json"}
    r = httpx.post(worker_url(cluster) + "/adapters/load", content=raw, headers=headers, timeout=30)
    assert r.status_code == 400 and "store:NAME@VERSION" in r.text


def test_admin_imports_a_drop_in_folder_into_a_tenants_namespace(cluster):
    """Local folders enter the store only from the allow-list (the drop-in folder), by an admin key, with
    their owner; a tenant key cannot, and no folder outside it can be named."""
    from serving_assets import build_lora

    build_lora(cluster.data_dir.parent / "model", cluster.data_dir / "adapters" / "importable", seed=7)
    body = {"folder": "importable", "owner": "tenant-a", "name": "imported"}
    r = httpx.post(cluster.url + "/v1/adapters/import", headers=TENANT, json=body, timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = httpx.post(cluster.url + "/v1/adapters/import", headers=ADMIN, json=body, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "imported" and r.json()["owner"] == "tenant-a" and r.json()["latest"] == 1
    for model in ("imported", "tenant-a/imported@1"):
        out = httpx.post(cluster.url + "/v1/completions", headers=TENANT, timeout=60,
                         json={"model": model, "prompt": "hello", "max_tokens": 2})
        assert out.status_code == 200, out.text
    for folder in ("../model", "importable/../../model", "/etc", "missing"):
        r = httpx.post(cluster.url + "/v1/adapters/import", headers=ADMIN, timeout=60,
                       json={"folder": folder, "owner": "tenant-a"})
        assert r.status_code == 404, r.text
        assert str(cluster.data_dir) not in r.text


@pytest.mark.parametrize("module", ["server", "workers.service"])
def test_processes_refuse_to_start_without_the_secret(module, tmp_path):
    import subprocess
    import sys

    from serving_cluster import ROOT, _env

    env = {k: v for k, v in _env().items() if not k.startswith("ADAPTERD_CLUSTER_SECRET")}
    args = [sys.executable, "-m", module, "--port", "1", "--redis-url", "redis://127.0.0.1:1/0", "--data-dir",
            str(tmp_path)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no cluster secret" in done.stderr, done.stderr[-2000:]
    short = subprocess.run(args, cwd=ROOT, env={**env, "ADAPTERD_CLUSTER_SECRET": "short"}, capture_output=True,
                           text=True, timeout=120)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr
