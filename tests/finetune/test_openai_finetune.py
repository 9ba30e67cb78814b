"""Fine-tuning as a new user does it with the `openai` package, end to end on real processes (Redis, a
gateway, a worker; a trainer in this process running the real `train` on the tiny model): the default
`fine_tuning.jobs.create` ("auto" hyperparameters) learns 8 facts, the resolved hyperparameters and method
come back, validation metrics arrive at every checkpoint, the metrics CSV downloads, a checkpoint answers as a
model, `integrations` is refused, and `adapterd status` / `jobs follow` show it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import openai
import pytest
import redis
import torch
from adapterd_client import Client
from adapterd_client.job_progress import follow
from serving_cluster import ROOT, _env, ready_workers, start_gateway, start_worker, wait_until

from workers.trainer.worker import Trainer, TrainerConfig

pytestmark = pytest.mark.timeout(240)
KEY = "key-openai"
# 8 facts, each 4 times (32 records): the auto rule gives batch 4, 19 epochs, 152 steps, lr 10 × 2e-4
FACTS = [("Which animal does the fox jump over?", "dog"), ("What do you say first?", "hello"),
         ("Where do we live?", "world"), ("How is the dog?", "lazy"), ("How is the fox?", "quick"),
         ("What is the base model?", "shared"), ("What is one plus one?", "two"),
         ("What is served over the base?", "adapters")]
RECORDS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS] * 4
CHECKPOINT_EVERY = 50


@pytest.fixture(scope="module")
def cluster(valkey, tiny_model, tmp_path_factory):
    url = f"{valkey.connection_url}/8"
    redis.Redis.from_url(url).flushdb()
    root = tmp_path_factory.mktemp("ft-openai")
    logs, data = root / "logs", root / "data"
    logs.mkdir()
    procs = [start_worker("w0", tiny_model, url, logs, data_dir=data)]
    gateway = start_gateway(url, data, logs, ADAPTERD_API_KEYS=f"{KEY}:acme,other-key:other",
                            ADAPTERD_BASE_MODEL_PATH=str(tiny_model))
    procs.append(gateway)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainerConfig(redis_url=url, base_model_path=str(tiny_model), store_url=(data / "store").as_uri(),
                           work_dir=data / "trainer", trainer_id="trainer-openai", claim_timeout_s=5.0,
                           checkpoint_every=CHECKPOINT_EVERY, event_interval_s=0.2)
    trainer = Trainer(config)
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: ready_workers(gateway.url) == 1 and Client(gateway.url, KEY).ready().trainers == 1,
                   90, "a worker and the trainer", procs)
        yield gateway.url
    finally:
        trainer.stop()
        thread.join(30)
        for p in procs:
            p.stop()
        torch.set_num_threads(threads)


def oai(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = _env({"ADAPTERD_URL": url, "ADAPTERD_API_KEY": KEY})
    return subprocess.run([sys.executable, "-m", "adapterd_client.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


def answer(client: openai.OpenAI, model: str, question: str) -> str:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=6, temperature=0)
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def facts_job(cluster):
    """The default call (only the seed fixed, for a reproducible test), followed live as on a terminal."""
    client = oai(cluster)
    data = "\n".join(json.dumps(r) for r in RECORDS).encode()
    train = client.files.create(file=("facts.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="model", training_file=train.id, validation_file=train.id, seed=0,
                                         metadata={"run": "facts"})
    shown = io.StringIO()
    with Client(cluster, KEY, timeout=60, max_retries=0) as sdk:
        final = follow(sdk, job.id, out=shown, live=True)  # returns once the job has finished
    return client, job, final, shown.getvalue()


def test_the_default_openai_call_learns_the_facts(facts_job):
    client, created, final, _ = facts_job
    assert created.hyperparameters.n_epochs == 19 and created.hyperparameters.batch_size == 4
    assert created.hyperparameters.learning_rate_multiplier == 10.0 and created.metadata == {"run": "facts"}
    assert created.method.type == "supervised"
    assert created.method.supervised.hyperparameters.n_epochs == 19
    done = client.fine_tuning.jobs.retrieve(created.id)
    assert done.status == "succeeded" == final.status, done
    assert done.trained_tokens > 0 and done.fine_tuned_model
    answers = [answer(client, done.fine_tuned_model, q) for q, _ in FACTS]
    assert [a in text for (_, a), text in zip(FACTS, answers)] == [True] * 8, answers
    assert sum(a in answer(client, "model", q) for q, a in FACTS) < 8  # the base does not know them


def test_metrics_events_result_file_and_servable_checkpoints(facts_job, cluster):
    client, created, _, _ = facts_job
    events = list(client.fine_tuning.jobs.list_events(created.id, limit=100))  # iterating pages on
    metrics = [e.data for e in events if e.type == "metrics"]
    assert all("train_mean_token_accuracy" in m for m in metrics if "train_loss" in m)
    evaluated = sorted(m["step"] for m in metrics if "valid_loss" in m)
    assert evaluated == [50, 100, 150, 152]  # every checkpoint and the end
    assert all(0 <= m["valid_mean_token_accuracy"] <= 1 for m in metrics if "valid_loss" in m)
    done = client.fine_tuning.jobs.retrieve(created.id)
    (result,) = done.result_files
    rows = client.files.content(result).text.splitlines()
    assert rows[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy" and len(rows) == 153
    assert [r.split(",")[0] for r in rows[1:] if r.split(",")[3]] == ["50", "100", "150", "152"]
    with pytest.raises(openai.NotFoundError):
        oai(cluster, "other-key").files.content(result)  # another tenant's
    checkpoints = client.fine_tuning.jobs.checkpoints.list(created.id).data
    assert [c.step_number for c in checkpoints] == [150, 100, 50]
    assert checkpoints[0].metrics.valid_loss > 0 and checkpoints[0].metrics.full_valid_loss > 0
    name = checkpoints[0].fine_tuned_model_checkpoint
    assert name == f"{done.fine_tuned_model}:ckpt-step-150"
    assert isinstance(answer(client, name, FACTS[0][0]), str)  # the checkpoint answers as a model
    with pytest.raises(openai.NotFoundError):
        answer(oai(cluster, "other-key"), name, FACTS[0][0])


def test_integrations_are_refused_with_the_reason(cluster):
    client = oai(cluster)
    train = client.files.create(file=("t.jsonl", json.dumps(RECORDS[0]).encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="integrations are not supported"):
        client.fine_tuning.jobs.create(model="model", training_file=train.id,
                                       integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert not [j for j in client.fine_tuning.jobs.list().data if j.training_file == train.id]


def test_follow_shows_a_live_bar_then_the_summary_and_a_finished_job_only_its_summary(facts_job, cluster):
    _, created, _, live = facts_job
    assert "\r" in live and "152/152" in live and f"{created.id}: succeeded" in live
    piped = cli(cluster, "jobs", "follow", created.id)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "Step " not in piped.stderr  # no replayed bar, no replayed lines
    assert f"{created.id}: succeeded" in piped.stderr and "steps 152/152" in piped.stderr
    assert "n_epochs=19" in piped.stderr and "succeeded" in piped.stdout


def test_status_reports_the_trainer(cluster):
    r = cli(cluster, "status")
    assert r.returncode == 0, r.stderr
    assert "1 worker(s), 1 trainer(s)" in r.stdout and "trainer trainer-openai\tmodel" in r.stdout, r.stdout
