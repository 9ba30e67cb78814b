"""The gateway checks uploads against the base model the workers publish in Redis (no model files, no
--base-model-path): before any worker has published, an upload is a 503 `base_model_unknown` that stores
nothing; once a worker's heartbeat carries the base model's config fields, the same upload is accepted and
one for another shape is refused."""

from __future__ import annotations

import json

import httpx
import pytest
import redis
from cluster_signing import cluster_secret
from serving_assets import build_lora
from serving_cluster import start_gateway, wait_until

from adapters_store.base_model import BaseModelSpec
from adapters_store.cluster_auth import ClusterSigner
from adapters_store.wire import WORKERS_SET, WorkerInfo, worker_key

pytestmark = pytest.mark.timeout(120)


def publish(db: redis.Redis, base: dict) -> None:
    """A worker record signed with the session's cluster secret, as a real worker's heartbeat is."""
    info = WorkerInfo(worker_id="published", url="http://127.0.0.1:9", model_id="model", capacity=1,
                      base_model=base).signed_by(ClusterSigner(cluster_secret()))
    db.set(worker_key(info.worker_id), info.to_json(), ex=60)
    db.sadd(WORKERS_SET, info.worker_id)


def test_uploads_wait_for_and_use_the_published_base(valkey, tiny_assets, tmp_path):
    model, _ = tiny_assets
    url = f"{valkey.connection_url}/14"
    db = redis.Redis.from_url(url)
    db.flushdb()
    logs = tmp_path / "logs"
    logs.mkdir()
    gw = start_gateway(url, tmp_path / "data", logs)
    try:
        wait_until(lambda: httpx.get(gw.url + "/health", timeout=2).status_code == 200, 60, "gateway", [gw])
        lora = build_lora(model, tmp_path / "lora", seed=3)
        files = [("files", (p.name, p.read_bytes())) for p in sorted(lora.iterdir())
                 if p.suffix in (".json", ".safetensors")]

        def upload(name: str) -> httpx.Response:
            return httpx.post(gw.url + "/v1/adapters", data={"name": name}, files=files, timeout=30)

        early = upload("early")
        assert early.status_code == 503 and early.json()["error"]["code"] == "base_model_unknown"
        assert httpx.get(gw.url + "/v1/adapters", timeout=10).json()["data"] == []
        spec = BaseModelSpec.from_folder(model)
        other = {**spec.to_config(), "hidden_size": spec.hidden_size * 2}
        publish(db, other)  # a base of another shape: the adapter does not fit it
        wait_until(lambda: upload("misfit").status_code == 422, 30, "the published base used")
        publish(db, spec.to_config())
        wait_until(lambda: upload("fits").status_code == 201, 30, "the right base published")
        names = [a["name"] for a in httpx.get(gw.url + "/v1/adapters", timeout=10).json()["data"]]
        assert names == ["fits"]
        assert json.loads(db.get(worker_key("published")))["base_model"] == spec.to_config()
    finally:
        gw.stop()
