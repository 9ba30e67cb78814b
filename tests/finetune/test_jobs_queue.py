"""Files and jobs through the HTTP API of a real gateway process (real Redis), with in-process trainers
running a fake `train` (same contract, real checkpoints and a real LoRA result): the queue, takeover of a
silent claim with resume from the checkpoint, the attempt limit, cancellation, failures, pagination,
tenant isolation, and every bad input refused with a clear 4xx."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
from adapterd_client import Client
from adapterd_client.job_progress import follow
from finetune_fakes import FakeTrain
from serving_cluster import start_gateway, wait_until

from adapters_store.backends import open_backend
from adapters_store.version_store import VersionStore
from workers.trainer.worker import Trainer, TrainerConfig

pytestmark = pytest.mark.timeout(60)
ALICE, BOB = "key-alice", "key-bob"
RECORDS = [{"prompt": "two plus two is", "completion": " four"},
           {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4


@pytest.fixture(scope="module")
def gateway(valkey, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ft-gw")
    url = f"{valkey.connection_url}/6"
    import redis

    redis.Redis.from_url(url).flushdb()
    logs = root / "logs"
    logs.mkdir()
    gw = start_gateway(url, root / "data", logs, ADAPTERD_API_KEYS=f"{ALICE}:alice,{BOB}:bob",
                       ADAPTERD_MODEL_ID="model", ADAPTERD_BASE_MODEL_PATH=str(tiny_model),
                       ADAPTERD_MAX_TRAINING_FILE_BYTES="4096", ADAPTERD_MAX_JOB_LIST_LIMIT="50")
    wait_until(lambda: httpx.get(gw.url + "/health").status_code == 200, 30, "gateway", [gw])
    yield gw, url, root / "data"
    gw.stop()


@pytest.fixture
def fresh(gateway):
    """An empty queue (no job left over from other tests)."""
    import redis

    redis.Redis.from_url(gateway[1]).flushdb()
    return gateway


def api(gw, method, path, key=ALICE, **kw) -> httpx.Response:
    return httpx.request(method, gw[0].url + path, headers={"authorization": f"Bearer {key}"}, timeout=30, **kw)


def upload(gw, records=RECORDS, key=ALICE, raw: bytes | None = None) -> httpx.Response:
    data = raw if raw is not None else "\n".join(json.dumps(r) for r in records).encode()
    return api(gw, "POST", "/v1/files", key, files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"})


def create(gw, key=ALICE, **body) -> httpx.Response:
    if "training_file" not in body:
        body["training_file"] = upload(gw, key=key).json()["id"]
    return api(gw, "POST", "/v1/fine_tuning/jobs", key, json={"model": "model", **body})


def trainer(gw, tiny_model, tmp_path, train, name="t1", **cfg) -> Trainer:
    config = TrainerConfig(redis_url=gw[1], base_model_path=str(tiny_model), store_url=(gw[2] / "store").as_uri(),
                           work_dir=tmp_path / "work", trainer_id=name, **{"claim_timeout_s": 0.6,
                                                                           "checkpoint_every": 2,
                                                                           "event_interval_s": 0.0, **cfg})
    return Trainer(config, train_fn=train)


def job(gw, job_id, key=ALICE) -> dict:
    return api(gw, "GET", f"/v1/fine_tuning/jobs/{job_id}", key).json()


def test_upload_validates_every_line(gateway):
    ok = upload(gateway)
    assert ok.status_code == 200 and ok.json()["records"] == len(RECORDS) and ok.json()["object"] == "file"
    bad = upload(gateway, raw=b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": }\n')
    assert bad.status_code == 400, bad.text
    err = bad.json()["error"]
    assert err["code"] == "invalid_training_file" and err["message"].startswith("line 3: not valid JSON")
    wrong = upload(gateway, raw=b'{"prompt": "a", "completion": "b"}\n{"messages": [{"role": "user", "content": "x"}]}')
    assert wrong.status_code == 400 and "line 2" in wrong.json()["error"]["message"]
    assert upload(gateway, raw=b"\n\n").status_code == 400
    big = upload(gateway, raw=(json.dumps(RECORDS[0]) + "\n").encode() * 200)
    assert big.status_code == 413
    purpose = api(gateway, "POST", "/v1/files", files={"file": ("t.jsonl", b"{}")}, data={"purpose": "batch"})
    assert purpose.status_code == 400
    listed = api(gateway, "GET", "/v1/files").json()["data"]
    assert [f["id"] for f in listed if f["id"] == ok.json()["id"]]
    assert api(gateway, "GET", f"/v1/files/{ok.json()['id']}", BOB).status_code == 404
    assert api(gateway, "DELETE", f"/v1/files/{ok.json()['id']}", BOB).status_code == 404
    assert api(gateway, "DELETE", f"/v1/files/{ok.json()['id']}").json()["deleted"] is True
    assert api(gateway, "GET", f"/v1/files/{ok.json()['id']}").status_code == 404


def test_bad_jobs_are_refused_and_change_nothing(gateway):
    before = api(gateway, "GET", "/v1/fine_tuning/jobs?limit=5").json()["data"]
    file_id = upload(gateway).json()["id"]
    cases = [
        ({"model": "ghost", "training_file": file_id}, 404, "model"),
        ({"training_file": "file-doesnotexist"}, 404, "training_file"),
        ({"training_file": file_id, "validation_file": "file-nope"}, 404, "validation_file"),
        ({"training_file": file_id, "method": {"type": "dpo"}}, 400, "method"),
        ({"training_file": file_id, "method": {"type": "lora", "rank": 0}}, 400, "method"),
        ({"training_file": file_id, "method": {"type": "medusa", "adapter": "ghost"}}, 404, "method"),
        ({"training_file": file_id, "compression": {"method": "zip"}}, 400, "compression"),
        ({"training_file": file_id, "suffix": "bad suffix!"}, 422, "suffix"),
        ({"training_file": file_id, "hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters"),
        ({"training_file": file_id, "hyperparameters": {"n_epochs": 2}, "method": {"type": "lora", "rank": 4}},
         400, "hyperparameters"),
        ({"training_file": file_id, "method": {"type": "supervised", "supervised": {"hyperparameters": {"x": 1}}}},
         400, "method"),
        ({"training_file": file_id, "method": {"type": "lora", "rank": 4, "lora": {"hyperparameters": {}}}},
         400, "method"),
        ({"training_file": file_id, "method": {"type": "lora", "n_epochs": 2, "epochs": 2}}, 400, "method"),
        ({"training_file": file_id, "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, 400,
         "integrations"),
        ({"training_file": file_id, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
        ({"training_file": file_id, "unknown_field": 1}, 422, "unknown_field"),
    ]
    for body, status, param in cases:
        r = api(gateway, "POST", "/v1/fine_tuning/jobs", json={"model": "model", **body})
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    other = create(gateway, BOB).json()  # bob's file is not alice's
    assert api(gateway, "POST", "/v1/fine_tuning/jobs", ALICE,
               json={"model": "model", "training_file": other["training_file"]}).status_code == 404
    assert api(gateway, "GET", "/v1/fine_tuning/jobs?limit=5").json()["data"] == before
    assert api(gateway, "GET", f"/v1/fine_tuning/jobs/{other['id']}").status_code == 404
    assert api(gateway, "POST", f"/v1/fine_tuning/jobs/{other['id']}/cancel").status_code == 404
    assert api(gateway, "GET", "/v1/fine_tuning/jobs/ftjob-nope/events").status_code == 404
    assert api(gateway, "GET", "/v1/fine_tuning/jobs?limit=51").status_code == 400


def test_job_runs_to_an_adapter(fresh, tiny_model, tmp_path):
    gateway = fresh
    valid = upload(gateway).json()["id"]
    created = create(gateway, validation_file=valid, suffix="demo", seed=7,
                     method={"type": "lora", "rank": 4}).json()
    assert created["status"] == "queued" and created["seed"] == 7
    assert created["method"]["type"] == "lora" and created["method"]["lora"]["hyperparameters"]["rank"] == 4
    train = FakeTrain(steps=5)
    t = trainer(gateway, tiny_model, tmp_path, train)
    assert t.run_once(block_s=2) == created["id"]
    done = job(gateway, created["id"])
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"] == f"ft:{created['model']}:demo:{created['id']}"
    assert done["validation_loss"] == 0.7 and done["step"] == 5 and done["finished_at"]
    assert done["trained_tokens"] == 5 * 32
    store = VersionStore(open_backend((gateway[2] / "store").as_uri()))
    manifest = store.latest(f"alice/{done['fine_tuned_model']}")  # the result lives in its owner's namespace
    assert manifest is not None and manifest.owner == "alice" and manifest.kind == "lora"
    events = api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/events?limit=50").json()["data"]
    messages = [e["message"] for e in reversed(events)]
    assert messages[0].startswith("Validating training file") and "succeeded" in messages[-1]
    metrics = [e["data"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert {m["step"] for m in metrics} == {1, 2, 3, 4, 5}
    page = api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/events?limit=2&after={events[1]['id']}")
    assert [e["id"] for e in page.json()["data"]] == [e["id"] for e in events[2:4]]
    ckpts = api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in ckpts] == [4, 2]
    streamed = api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/events?stream=true")
    lines = [ln[6:] for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]" and len(lines) - 1 == len(events)
    (result,) = done["result_files"]  # the metrics CSV, the job tenant's alone
    csv = api(gateway, "GET", f"/v1/files/{result}/content")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert api(gateway, "GET", f"/v1/files/{result}/content", BOB).status_code == 404
    assert api(gateway, "GET", f"/v1/files/{valid}/content").content == upload_bytes()


def upload_bytes(records=RECORDS) -> bytes:
    return "\n".join(json.dumps(r) for r in records).encode()


def test_openai_shapes_are_resolved_and_echoed_and_a_job_without_trainer_says_so(fresh):
    gateway = fresh  # no trainer heartbeats here
    nested = create(gateway, method={"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}}, metadata={"team": "search"}).json()
    assert nested["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    hp = nested["method"]["supervised"]["hyperparameters"]
    assert nested["method"]["type"] == "supervised" and hp["rank"] == 8 and hp["lr"] == 1e-4 and hp["n_epochs"] == 2
    assert nested["metadata"] == {"team": "search"} and job(gateway, nested["id"])["metadata"] == {"team": "search"}
    top = create(gateway, hyperparameters={"n_epochs": "auto", "batch_size": 2}).json()
    assert top["hyperparameters"]["batch_size"] == 2 and top["hyperparameters"]["n_epochs"] >= 3
    assert top["hyperparameters"]["learning_rate_multiplier"] == 10.0  # 8 records: the auto rule's
    s2ft = create(gateway, method={"type": "s2ft", "s2ft": {"hyperparameters": {"head_ratio": 0.5}}}).json()
    assert s2ft["method"]["s2ft"]["hyperparameters"]["head_ratio"] == 0.5
    events = api(gateway, "GET", f"/v1/fine_tuning/jobs/{top['id']}/events").json()["data"]
    warning = [e for e in events if e["message"].startswith("No trainer is running for model")]
    assert warning and warning[0]["level"] == "warn" and "adapterd trainer" in warning[0]["message"]
    shown = io.StringIO()  # `jobs follow` shows it while the job waits
    with Client(gateway[0].url, ALICE, timeout=30, max_retries=0) as sdk:
        following = threading.Thread(target=follow, args=(sdk, top["id"], shown, False), daemon=True)
        following.start()
        wait_until(lambda: "No trainer is running" in shown.getvalue(), 10, "the warning followed")
        api(gateway, "POST", f"/v1/fine_tuning/jobs/{top['id']}/cancel")
        following.join(10)
    assert not following.is_alive() and f"{top['id']}: cancelled" in shown.getvalue()


def test_list_is_paginated_newest_first(gateway):
    ids = [create(gateway, BOB).json()["id"] for _ in range(3)]
    first = api(gateway, "GET", "/v1/fine_tuning/jobs?limit=2", BOB).json()
    assert first["object"] == "list" and [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = api(gateway, "GET", f"/v1/fine_tuning/jobs?limit=5&after={ids[1]}", BOB).json()
    assert rest["data"][0]["id"] == ids[0]
    assert all(j["organization_id"] == "bob" for j in rest["data"])
    alice = api(gateway, "GET", "/v1/fine_tuning/jobs?limit=5").json()["data"]
    assert not set(ids) & {j["id"] for j in alice}


def test_silent_claim_is_taken_over_and_resumed_from_the_checkpoint(fresh, tiny_model, tmp_path):
    gateway = fresh
    created = create(gateway).json()
    stale = FakeTrain(steps=8, hold_at=6)
    a = trainer(gateway, tiny_model, tmp_path / "a", stale, "dead")  # no heartbeat: as if killed
    thread = threading.Thread(target=a.run_once, kwargs={"block_s": 2})
    thread.start()
    wait_until(lambda: job(gateway, created["id"])["step"] >= 5, 10, "the first trainer at step 5")
    fresh = FakeTrain(steps=8)
    b = trainer(gateway, tiny_model, tmp_path / "b", fresh, "alive")
    deadline = time.monotonic() + 10
    while b.run_once(block_s=0.2) != created["id"] and time.monotonic() < deadline:
        pass
    done = job(gateway, created["id"])
    assert done["status"] == "succeeded" and fresh.started_from == [4], (done, fresh.started_from)
    stale.gate.set()
    thread.join(10)
    assert not thread.is_alive()
    after = job(gateway, created["id"])
    assert after["status"] == "succeeded" and after["fine_tuned_model"] == done["fine_tuned_model"]
    messages = [e["message"] for e in api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/events?limit=50")
                .json()["data"]]
    assert any("took the job over from dead" in m for m in messages)
    assert any("Resuming from the checkpoint at step 4" in m for m in messages)
    assert b.queue.pending() == 0


def test_attempt_limit_fails_the_job_with_its_reason(fresh, tiny_model, tmp_path):
    gateway = fresh
    created = create(gateway).json()
    stale = FakeTrain(steps=4, hold_at=2)
    a = trainer(gateway, tiny_model, tmp_path / "a", stale, "dead", max_attempts=1)
    thread = threading.Thread(target=a.run_once, kwargs={"block_s": 2})
    thread.start()
    wait_until(lambda: job(gateway, created["id"])["status"] == "running", 10, "running")
    b = trainer(gateway, tiny_model, tmp_path / "b", FakeTrain(), "alive", max_attempts=1)
    deadline = time.monotonic() + 10
    while b.run_once(block_s=0.2) != created["id"] and time.monotonic() < deadline:
        pass
    stale.gate.set()
    thread.join(10)
    failed = job(gateway, created["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "too_many_attempts", failed
    assert "dead" in failed["error"]["message"]


def test_cancel_stops_a_running_job_within_a_few_steps(fresh, tiny_model, tmp_path):
    gateway = fresh
    created = create(gateway).json()
    train = FakeTrain(steps=500, step_s=0.02)
    t = trainer(gateway, tiny_model, tmp_path, train)
    thread = threading.Thread(target=t.run_once, kwargs={"block_s": 2})
    thread.start()
    wait_until(lambda: job(gateway, created["id"])["step"] >= 3, 10, "running")
    r = api(gateway, "POST", f"/v1/fine_tuning/jobs/{created['id']}/cancel")
    assert r.status_code == 200, r.text
    at_cancel = r.json()["step"]
    thread.join(10)
    final = job(gateway, created["id"])
    assert final["status"] == "cancelled" and final["step"] - at_cancel <= 5, final
    assert api(gateway, "POST", f"/v1/fine_tuning/jobs/{created['id']}/cancel").status_code == 409


def test_cancel_queued_and_training_failure(fresh, tiny_model, tmp_path):
    gateway = fresh
    queued = create(gateway).json()
    cancelled = api(gateway, "POST", f"/v1/fine_tuning/jobs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    failing = create(gateway).json()
    train = FakeTrain(fail_with=RuntimeError("loss is NaN"))
    t = trainer(gateway, tiny_model, tmp_path, train)
    handled = [t.run_once(block_s=0.5) for _ in range(3)]
    assert queued["id"] in handled and failing["id"] in handled and train.calls == 1
    failed = job(gateway, failing["id"])
    assert failed["status"] == "failed" and failed["error"] == {
        "code": "training_failed", "message": "RuntimeError: loss is NaN", "param": None}


def test_a_stopping_trainer_hands_its_job_over_at_once(fresh, tiny_model, tmp_path):
    gateway = fresh
    created = create(gateway).json()
    a = trainer(gateway, tiny_model, tmp_path / "a", FakeTrain(steps=400, step_s=0.01), "leaving",
                claim_timeout_s=30.0)
    thread = threading.Thread(target=a.run, daemon=True)
    thread.start()
    wait_until(lambda: job(gateway, created["id"])["step"] >= 5, 10, "running")
    a.stop()  # what SIGTERM does
    thread.join(10)
    fresh_train = FakeTrain(steps=400)
    b = trainer(gateway, tiny_model, tmp_path / "b", fresh_train, "staying", claim_timeout_s=30.0)
    assert b.run_once(block_s=0.5) == created["id"]  # no 30 s wait: the claim was released
    done = job(gateway, created["id"])
    assert done["status"] == "succeeded" and fresh_train.started_from and fresh_train.started_from[0] >= 4


def test_a_stopping_trainer_checkpoints_before_it_hands_over(fresh, tiny_model, tmp_path):
    """SIGTERM on a trainer (the real `train`): it saves its progress at the step it stopped on, releases
    the claim, and the next trainer resumes from exactly that step (no periodic checkpoint in between)."""
    gateway = fresh
    created = create(gateway, method={"type": "lora", "rank": 2, "epochs": 400, "batch_size": 8,
                                      "max_seq_len": 32}).json()
    a = trainer(gateway, tiny_model, tmp_path / "a", None, "draining", claim_timeout_s=30.0, checkpoint_every=100000)
    thread = threading.Thread(target=a.run, daemon=True)
    thread.start()
    wait_until(lambda: job(gateway, created["id"])["step"] >= 3, 30, "training")
    a.stop()  # what SIGTERM does
    thread.join(30)
    assert not thread.is_alive()
    saved = api(gateway, "GET", f"/v1/fine_tuning/jobs/{created['id']}/checkpoints").json()["data"]
    assert len(saved) == 1 and saved[0]["step_number"] >= 3
    resumed = FakeTrain(steps=saved[0]["step_number"] + 2)
    b = trainer(gateway, tiny_model, tmp_path / "b", resumed, "next", claim_timeout_s=30.0)  # from the store
    assert b.run_once(block_s=0.5) == created["id"]  # at once: the claim was released
    assert resumed.started_from == [saved[0]["step_number"]]
