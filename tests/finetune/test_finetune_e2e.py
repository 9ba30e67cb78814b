"""Fine-tuning end to end on real processes (Redis, gateway, a worker, a trainer process and a trainer in
the test process, both running the real `train` on the tiny model): LoRA and S²FT jobs through the HTTP API
whose adapters then answer through the API, `kill -9` of the trainer process mid-job with another trainer
taking the job over from its checkpoint (same job id), cancellation of a running job, and the CLI
(`files upload`, `jobs create --follow`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import redis
import torch
from adapterd_client import Client
from serving_cluster import ROOT, Proc, _env, ready_workers, start_gateway, start_worker, wait_until

from workers.trainer.worker import Trainer, TrainerConfig

pytestmark = pytest.mark.timeout(120)
KEY = "key-e2e"
RECORDS = [{"prompt": "two plus two is", "completion": " four."},
           {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog."},
           {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]},
           {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two?"},
                         {"role": "assistant", "content": "two is 2."}]}] * 4
SMALL = {"batch_size": 4, "max_seq_len": 64}


def start_trainer(name: str, model, redis_url: str, data_dir, logs) -> Proc:
    log = logs / f"{name}.log"
    args = [sys.executable, "-m", "workers.trainer.worker", "--redis-url", redis_url, "--model", str(model),
            "--data-dir", str(data_dir), "--trainer-id", name, "--claim-timeout", "2", "--checkpoint-every", "5",
            "--event-interval", "0.2", "--log-level", "warning"]
    popen = subprocess.Popen(args, cwd=ROOT, env=_env({"OMP_NUM_THREADS": "1"}), stdout=log.open("wb"),
                             stderr=subprocess.STDOUT)
    return Proc(name, "", popen, log)


class LocalTrainer:
    """A trainer in this process (the real `train`; torch is warm here, which spares the 2 shared cores a
    second trainer process start-up)."""

    def __init__(self, name: str, model, redis_url: str, data_dir):
        config = TrainerConfig(redis_url=redis_url, base_model_path=str(model), store_url=(data_dir / "store").as_uri(),
                               work_dir=data_dir / "trainer", trainer_id=name, claim_timeout_s=2.0,
                               checkpoint_every=5, event_interval_s=0.2)
        self.trainer = Trainer(config)
        self.thread = threading.Thread(target=self.trainer.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.trainer.stop()
        self.thread.join(30)


@pytest.fixture(scope="module")
def cluster(valkey, tiny_model, tmp_path_factory):
    url = f"{valkey.connection_url}/7"
    redis.Redis.from_url(url).flushdb()
    root = tmp_path_factory.mktemp("ft-e2e")
    logs, data = root / "logs", root / "data"
    logs.mkdir()
    procs = [start_worker("w0", tiny_model, url, logs, data_dir=data),
             start_trainer("trainer-a", tiny_model, url, data, logs)]
    gateway = start_gateway(url, data, logs, ADAPTERD_API_KEYS=f"{KEY}:e2e", ADAPTERD_BASE_MODEL_PATH=str(tiny_model))
    procs.append(gateway)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer processes run (OMP_NUM_THREADS=1): 2 shared cores
    local = {"trainer": LocalTrainer("trainer-b", tiny_model, url, data)}
    trainers = redis.Redis.from_url(url)
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1 and len(trainers.smembers("adapterd:v1:trainers")) == 2,
                   90, "a worker and two trainers", procs)
        yield {"url": gateway.url, "procs": {p.name: p for p in procs}, "local": local,
               "start_local": lambda name: LocalTrainer(name, tiny_model, url, data)}
    finally:
        local["trainer"].stop()
        for p in procs:
            p.stop()
        torch.set_num_threads(threads)


def client(cluster) -> Client:
    return Client(cluster["url"], KEY, timeout=60, max_retries=0)


def upload(c: Client, tmp_path, records=RECORDS, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return c.upload_file(path).id


def wait_job(c: Client, job_id: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get_job(job_id)
        if job.finished:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {c.get_job(job_id).status}")


def answers(cluster, model: str) -> str:
    r = httpx.post(cluster["url"] + "/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": model, "prompt": "two plus two is", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("method, compression, kind", [
    ({"type": "lora", "rank": 4, "epochs": 2, **SMALL}, {"method": "compeft", "density": 0.5, "alpha": 1.0},
     "compeft"),
    ({"type": "s2ft", "head_ratio": 0.5, "channel_ratio": 0.1, "epochs": 2, **SMALL}, None, "s2ft"),
])
def test_job_trains_publishes_and_serves(cluster, tmp_path, method, compression, kind):
    with client(cluster) as c:
        train, valid = upload(c, tmp_path), upload(c, tmp_path, RECORDS[:4], "valid.jsonl")
        job = c.create_job("model", train, method, validation_file=valid, suffix="e2e", seed=3,
                           compression=compression)
        events = list(c.follow_job(job.id))  # returns once the job has finished
        done = c.get_job(job.id)
        assert done.status == "succeeded", (done, [e.message for e in events])
        steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
        assert steps[0] == 1 and steps[-1] == done.total_steps == 8
        assert done.validation_loss is not None and done.fine_tuned_model.endswith(job.id)
        assert any(m.id == done.fine_tuned_model for m in c.models().data)
        stored = c.get_adapter(done.fine_tuned_model).versions
        assert [v.kind for v in stored] == [kind] and stored[0].owner == "e2e"
        assert answers(cluster, done.fine_tuned_model)


def test_kill_9_of_the_trainer_mid_job_is_taken_over_from_the_checkpoint(cluster, tmp_path):
    cluster["local"]["trainer"].stop()  # the job goes to the trainer process
    with client(cluster) as c:
        job = c.create_job("model", upload(c, tmp_path), {"type": "lora", "epochs": 20, **SMALL})
        wait_until(lambda: c.get_job(job.id).step >= 7, 60, "step 7")
        started = [e.message for e in c.list_job_events(job.id, limit=100).data if "started on trainer" in e.message]
        owner = started[0].rsplit(" ", 1)[1]
        assert owner == "trainer-a"
        cluster["procs"][owner].kill9()
        # what the killed trainer left: its last recorded checkpoint (the job's step field is progress,
        # published on its own schedule, so it may lag or lead the checkpoints; it is not the reference)
        saved = max(cp.step_number for cp in c.list_job_checkpoints(job.id, limit=100).data)
        cluster["local"]["trainer"] = cluster["start_local"]("trainer-c")  # another trainer
        done = wait_job(c, job.id, 90)
        events = list(c.follow_job(job.id))  # every event, oldest first
        messages = [e.message for e in events]
        assert 5 <= saved < 80 and done.status == "succeeded" and done.id == job.id, (done, messages)
        assert any(f"from {owner}" in m for m in messages), messages
        resumed = [m for m in messages if m.startswith("Resuming from the checkpoint at step")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) == saved, (resumed, saved)  # exactly where it was
        assert done.total_steps == 80 and answers(cluster, done.fine_tuned_model)


def test_cancel_stops_a_running_job(cluster, tmp_path):
    with client(cluster) as c:
        job = c.create_job("model", upload(c, tmp_path), {"type": "lora", "epochs": 50, **SMALL})
        wait_until(lambda: c.get_job(job.id).step >= 2, 60, "running")
        assert c.cancel_job(job.id).status in ("running", "cancelled")
        t0 = time.monotonic()
        done = wait_job(c, job.id, 30)
        assert done.status == "cancelled" and time.monotonic() - t0 < 5
        assert done.step < 200


def test_cli_upload_and_follow(cluster, tmp_path):
    cli = [sys.executable, "-m", "adapterd_client.cli"]
    env = _env({"ADAPTERD_URL": cluster["url"], "ADAPTERD_API_KEY": KEY})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + '{"prompt": "x"}\n')
    r = subprocess.run([*cli, "files", "upload", str(bad)], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "line 2" in r.stderr, r.stderr
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(x) for x in RECORDS))
    r = subprocess.run([*cli, "jobs", "create", str(good), "--model", "model", "--param", "batch_size=8",
                        "--param", "epochs=1", "--param", "max_seq_len=64", "--suffix", "cli", "--follow"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "succeeded" in r.stdout and "2/2" in r.stderr and "loss=" in r.stderr, (r.stdout, r.stderr)
    assert "\r" not in r.stderr  # piped: plain lines, no progress-bar frames




def test_a_medusa_job_publishes_heads_that_the_base_then_decodes_with(cluster, tmp_path):
    with client(cluster) as c:
        method = {"type": "medusa", "num_heads": 3, "epochs": 2, "max_new_tokens": 16, **SMALL}
        job = c.create_job("model", upload(c, tmp_path), method, suffix="heads", seed=1)
        done = wait_job(c, job.id, timeout=90)
        assert done.status == "succeeded", done
        (heads,) = c.get_adapter(done.fine_tuned_model).versions
        assert heads.kind == "medusa" and heads.attach_to is None  # distilled from the base: the base's heads
    r = httpx.post(cluster["url"] + "/generate", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"inputs": "two plus two is", "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["speculative"]["decode_steps"] > 0  # the worker verified trees with them
