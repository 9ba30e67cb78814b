"""The SDK's files and jobs methods against scripted transports (request shapes, typed errors, the
followed event stream, sync and async alike), their models against the gateway's OpenAPI schema, and
`adapterd serve --trainers N` starting the trainers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from adapterd_client import AsyncClient, BadRequestError, Client, NotFoundError
from adapterd_client import models as sdk_models

JOB = {"id": "ftjob-1", "object": "fine_tuning.job", "created_at": 1, "model": "m", "organization_id": "t",
       "status": "running", "training_file": "file-1", "method": {"type": "lora"}, "seed": 1, "step": 3,
       "total_steps": 10}
EVENT = {"id": "ftevent-1-0", "object": "fine_tuning.job.event", "created_at": 1, "level": "info",
         "message": "Step 1/10", "type": "metrics", "data": {"step": 1, "total_steps": 10, "train_loss": 1.0}}


class Script:
    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request):
        self.requests.append(request)
        return self.responses.pop(0)


def client(script) -> Client:
    return Client("http://x", api_key="k", transport=httpx.MockTransport(script), backoff_s=0.001)


def test_files_and_jobs_requests(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    file = {"id": "file-1", "object": "file", "bytes": 10, "created_at": 1, "filename": "t.jsonl",
            "purpose": "fine-tune", "status": "processed", "records": 1}
    bad = {"error": {"type": "invalid_request_error", "message": "line 2: not valid JSON", "param": "file",
                     "code": "invalid_training_file"}}
    script = Script(httpx.Response(200, json=file), httpx.Response(400, json=bad), httpx.Response(200, json=JOB),
                    httpx.Response(200, json={"object": "list", "data": [JOB], "has_more": True}),
                    httpx.Response(404, json={"error": {"type": "not_found_error", "message": "no",
                                                        "code": "job_not_found"}}))
    c = client(script)
    assert c.upload_file(path).records == 1
    assert b'name="purpose"' in script.requests[0].content and b"t.jsonl" in script.requests[0].content
    with pytest.raises(BadRequestError) as exc:
        c.upload_file(path)
    assert exc.value.code == "invalid_training_file" and "line 2" in exc.value.message
    job = c.create_job("m", "file-1", {"type": "lora", "rank": 4}, suffix="s", seed=1)
    assert job.status == "running" and not job.finished
    assert json.loads(script.requests[2].content) == {"model": "m", "training_file": "file-1",
                                                      "method": {"type": "lora", "rank": 4}, "suffix": "s", "seed": 1}
    page = c.list_jobs(after="ftjob-0", limit=5)
    assert page.has_more and dict(script.requests[3].url.params) == {"after": "ftjob-0", "limit": "5"}
    with pytest.raises(NotFoundError):
        c.get_job("ftjob-x")


def test_follow_stream_sync_and_async():
    body = f"data: {json.dumps(EVENT)}\n\n: keepalive\n\ndata: {json.dumps(EVENT)}\n\ndata: [DONE]\n\n".encode()
    sse = {"content-type": "text/event-stream"}
    script = Script(httpx.Response(200, content=body, headers=sse))
    events = list(client(script).follow_job("ftjob-1"))
    assert [e.data["step"] for e in events] == [1, 1]
    assert script.requests[0].url.params["stream"] == "true"

    async def run():
        s = Script(httpx.Response(200, content=body, headers=sse), httpx.Response(200, json=JOB))
        async with AsyncClient("http://x", transport=httpx.MockTransport(s)) as c:
            got = [e async for e in await c.follow_job("ftjob-1")]
            return got, await c.cancel_job("ftjob-1")

    import asyncio

    got, job = asyncio.run(run())
    assert len(got) == 2 and job.id == "ftjob-1"


@pytest.fixture(scope="module")
def openapi_schemas():
    from server.app import create_app
    from server.settings import GatewaySettings

    return create_app(GatewaySettings()).openapi()["components"]["schemas"]


@pytest.mark.parametrize("sdk, server", [
    ("FileObject", "FileObject"), ("FileList", "FileList"), ("FileDeleted", "FileDeleted"),
    ("FineTuningJob", "FineTuningJob"), ("FineTuningJobList", "FineTuningJobList"),
    ("FineTuningJobEventList", "FineTuningJobEventList"), ("FineTuningJobEvent", "FineTuningJobEvent"),
    ("FineTuningJobCheckpointList", "FineTuningJobCheckpointList"),
    ("FineTuningJobCheckpoint", "FineTuningJobCheckpoint"), ("JobError", "JobError"),
])
def test_sdk_models_match_server_openapi(sdk, server, openapi_schemas):
    server_schema = openapi_schemas[server]
    sdk_fields = getattr(sdk_models, sdk).model_fields
    assert set(sdk_fields) == set(server_schema["properties"]), (sdk, server)
    assert {n for n, f in sdk_fields.items() if f.is_required()} <= set(server_schema.get("required", []))


def test_serve_starts_trainers(tmp_path, monkeypatch):
    from server.launcher import Launcher, ServeOptions

    spawned = []
    launcher = Launcher(ServeOptions(workers=1, trainers=2, model="/m", redis_url="redis://r", data_dir=tmp_path))
    monkeypatch.setattr(launcher, "_spawn", lambda name, args, **kw: spawned.append((name, args)))
    monkeypatch.setattr(launcher, "_wait_ready", lambda: None)
    launcher.start()
    trainers = [args for name, args in spawned if name.startswith("trainer-")]
    assert len(trainers) == 2
    assert trainers[0][:2] == ["-m", "workers.trainer.worker"]
    assert "/m" in trainers[0] and str(Path(tmp_path).resolve()) in trainers[0]
    assert launcher.child_env["ADAPTERD_REDIS_URL"] == "redis://r"  # in the environment, not the command line
    assert not any("redis://" in arg for _, args in spawned for arg in args)
