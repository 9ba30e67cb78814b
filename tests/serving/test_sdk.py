"""The SDK against scripted transports (retries, error mapping, streams), and its models against the
gateway's OpenAPI schema."""

import json

import httpx
import pytest
from adapterd_client import (
    APIConnectionError,
    AsyncClient,
    Client,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
)
from adapterd_client import models as sdk_models

COMPLETION = {
    "id": "c1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def error(status, code):
    body = {"error": {"type": "t", "message": "m", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers={"retry-after": "0"})


class Script:
    def __init__(self, *responses):
        self.responses = list(responses)
        self.requests = []

    def __call__(self, request):
        self.requests.append(request)
        item = self.responses.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def sse(text: str) -> httpx.Response:
    return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})


def client(script, **kw):
    return Client("http://x", api_key="k", transport=httpx.MockTransport(script), backoff_s=0.001, **kw)


def test_retries_then_succeeds():
    script = Script(error(503, "no_worker_available"), error(429, "overloaded"), httpx.Response(200, json=COMPLETION))
    r = client(script).completions("m", "p", max_tokens=3)
    assert r.choices[0].text == "hi" and len(script.requests) == 3
    body = json.loads(script.requests[0].content)
    assert body == {"model": "m", "prompt": "p", "stream": False, "max_tokens": 3}
    assert script.requests[0].headers["authorization"] == "Bearer k"


def test_gives_up_with_typed_error():
    script = Script(*[error(503, "no_worker_available")] * 3)
    with pytest.raises(ServiceUnavailableError) as exc:
        client(script, max_retries=2).models()
    assert exc.value.code == "no_worker_available" and len(script.requests) == 3


def test_no_retry_on_client_errors():
    script = Script(error(404, "model_not_found"))
    with pytest.raises(NotFoundError) as exc:
        client(script).chat("ghost", [{"role": "user", "content": "x"}])
    assert exc.value.status_code == 404 and len(script.requests) == 1


def test_connection_errors_retry_then_raise():
    script = Script(*[httpx.ConnectError("refused")] * 2)
    with pytest.raises(APIConnectionError):
        client(script, max_retries=1).models()
    assert len(script.requests) == 2


def test_stream_and_in_band_error():
    chunk = json.dumps({**COMPLETION, "usage": None})
    ok = f"data: {chunk}\n\ndata: {chunk}\n\ndata: [DONE]\n\n"
    script = Script(sse(ok))
    assert [c.choices[0].text for c in client(script).completions_stream("m", "p")] == ["hi", "hi"]
    bad = f"data: {chunk}\n\ndata: " + json.dumps({"error": {"type": "server_error", "message": "gone"}}) + "\n\n"
    script = Script(sse(bad))
    with pytest.raises(StreamError):
        list(client(script).completions_stream("m", "p"))


# one event's JSON split over three `data:` lines (SSE joins them with newlines), CRLF line ends, a comment,
# an `event:`/`id:` pair and an event without data: all framing the SDK's parser (httpx-sse) must read
_ONE = json.dumps({**COMPLETION, "usage": None})
SPLIT = _ONE.replace(", ", ",\n", 2).split("\n")  # cut after a comma: the joined lines are valid JSON
FRAMED = (": keep-alive\r\n\r\n" + "".join(f"data: {part}\r\n" for part in SPLIT) + "\r\n"
          + "event: ping\r\nid: 7\r\n\r\n" + "data: [DONE]\r\n\r\n")


def test_stream_reads_multi_line_events_crlf_and_comments():
    assert [c.choices[0].text for c in client(Script(sse(FRAMED))).completions_stream("m", "p")] == ["hi"]


def test_a_200_that_is_not_an_event_stream_is_a_stream_error():
    script = Script(httpx.Response(200, json=COMPLETION))  # application/json where SSE was asked for
    with pytest.raises(StreamError, match="text/event-stream"):
        list(client(script).completions_stream("m", "p"))


async def test_async_stream_reads_the_same_framing():
    async with AsyncClient("http://x", transport=httpx.MockTransport(Script(sse(FRAMED))), backoff_s=0.001) as c:
        assert [ch.choices[0].text async for ch in await c.completions_stream("m", "p")] == ["hi"]


async def test_async_client_same_behaviour():
    script = Script(error(429, "overloaded"), httpx.Response(200, json=COMPLETION))
    async with AsyncClient("http://x", transport=httpx.MockTransport(script), backoff_s=0.001) as c:
        assert (await c.completions("m", "p")).usage.total_tokens == 2
    script = Script(*[error(429, "overloaded")] * 2)
    async with AsyncClient("http://x", transport=httpx.MockTransport(script), backoff_s=0.001, max_retries=1) as c:
        with pytest.raises(RateLimitError):
            await c.completions("m", "p")


def test_generate_body_is_tgi_shaped():
    script = Script(httpx.Response(200, json={"generated_text": "x", "details": None}))
    client(script).generate("hi", adapter_id="a", max_new_tokens=4, temperature=None)
    assert json.loads(script.requests[0].content) == {
        "inputs": "hi",
        "parameters": {"adapter_id": "a", "max_new_tokens": 4},
    }


@pytest.mark.parametrize(
    "sdk, server",
    [
        ("Completion", "CompletionResponse"),
        ("ChatCompletion", "ChatCompletionResponse"),
        ("ChatCompletionChunk", "ChatCompletionChunk"),
        ("ModelList", "ModelList"),
        ("ModelCard", "ModelCard"),
        ("GenerateResponse", "GenerateResponse"),
        ("StreamResponse", "StreamResponse"),
        ("Usage", "Usage"),
    ],
)
def test_sdk_models_match_server_openapi(sdk, server):
    from server.app import create_app
    from server.protocol import ChatCompletionChunk, StreamResponse
    from server.settings import GatewaySettings

    spec = create_app(GatewaySettings()).openapi()
    schemas = dict(spec["components"]["schemas"])
    for extra in (ChatCompletionChunk, StreamResponse):  # streamed shapes are not route response models
        schemas.update(extra.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
        schemas[extra.__name__] = extra.model_json_schema(ref_template="#/components/schemas/{model}")
    server_schema = schemas[server]
    sdk_fields = getattr(sdk_models, sdk).model_fields
    assert set(sdk_fields) == set(server_schema["properties"]), (sdk, server)
    required = set(server_schema.get("required", []))
    optional_in_sdk = {n for n, f in sdk_fields.items() if not f.is_required()}
    assert not (optional_in_sdk - set(server_schema["properties"]))
    assert {n for n, f in sdk_fields.items() if f.is_required()} <= required
