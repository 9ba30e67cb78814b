"""Server-sent events for the gateway's streams, framed by `adapters_store.event_stream` (the one writer,
shared with the worker). Token chunks are hot (one per generated
token), so they are plain dicts rendered by orjson, inside an envelope rendered once per stream."""

from __future__ import annotations

import orjson
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from adapters_store import event_stream

DONE = event_stream.DONE  # an OpenAI-shaped stream's end
MEDIA_TYPE = "text/event-stream"
# OpenAPI for a route that answers JSON, or SSE when the request asks to stream
OR_STREAM = {200: {"content": {MEDIA_TYPE: {"schema": {"type": "string", "description": "`data: {json}` events"}}}}}


class EventStreamResponse(StreamingResponse):
    """A streamed SSE response; as a route's `response_class` it documents the route as text/event-stream."""

    media_type = MEDIA_TYPE


def event(payload: BaseModel | dict) -> bytes:
    if isinstance(payload, BaseModel):
        return event_stream.frame(payload.model_dump_json().encode())
    return event_stream.event(payload)


def error_event(err: dict) -> bytes:
    return event(err)


class Envelope:
    """One stream's fixed fields (`id`, `object`, `created`, `model`), rendered once; `chunk` adds the
    per-chunk `choices` and `usage`, giving the same JSON as the protocol's chunk model would."""

    def __init__(self, **fields: str | int):
        self._head = event_stream.DATA + orjson.dumps(fields)[:-1] + b',"choices":'
        self._tail = b"}" + event_stream.END

    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        return self._head + orjson.dumps(choices) + b',"usage":' + orjson.dumps(usage) + self._tail
