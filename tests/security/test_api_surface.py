"""What the gateway's API tells: training file names are kept sanitised (never a path), and the OpenAPI
document gives each response its true content type (SSE streams, Prometheus text)."""

import httpx
import pytest

from server.app import create_app
from server.settings import GatewaySettings


@pytest.fixture
async def gateway(redis_url, tmp_path):
    app = create_app(GatewaySettings(redis_url=redis_url, data_dir=tmp_path, api_keys="k:alice"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw",
                                     headers={"authorization": "Bearer k"}) as client:
            yield client


@pytest.mark.parametrize(("given", "kept"), [
    ("../../../x.jsonl", "x.jsonl"),
    ("..\\..\\windows\\y.jsonl", "y.jsonl"),
    ("/etc/passwd", "passwd"),
    ("my data (v2).jsonl", "my_data_v2_.jsonl"),
    ("..", "upload.jsonl"),
    ("\u202etxt.lmth", "_txt.lmth"),
])
async def test_training_file_names_are_sanitised(gateway, given, kept):
    line = b'{"prompt": "a", "completion": "b"}\n'
    r = await gateway.post("/v1/files", files={"file": (given, line)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == kept
    assert (await gateway.get(f"/v1/files/{r.json()['id']}")).json()["filename"] == kept


def test_openapi_content_types_are_true():
    paths = create_app(GatewaySettings()).openapi()["paths"]

    def content(path: str, method: str = "post") -> set[str]:
        return set(paths[path][method]["responses"]["200"]["content"])

    for path in ("/v1/completions", "/v1/chat/completions", "/generate"):  # JSON, or SSE with stream=true
        assert content(path) == {"application/json", "text/event-stream"}
    assert content("/generate_stream") == {"text/event-stream"}
    assert content("/v1/fine_tuning/jobs/{job_id}/events", "get") == {"application/json", "text/event-stream"}
    (metrics,) = content("/metrics", "get")
    assert metrics.startswith("text/plain")
