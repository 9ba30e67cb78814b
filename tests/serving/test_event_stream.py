"""The one SSE writer (`adapters_store.event_stream`) and the gateway's reader of worker streams agree, at
any split of the bytes; the gateway's per-stream envelope (a fast path) writes what the plain writer does."""

import orjson
import pytest

from adapters_store import event_stream
from server.errors import UpstreamError
from server.sse import Envelope
from server.worker_client import SseEvents

EVENTS = [{"token": "a", "text": "é\n"}, {"token": "b", "logprob": -0.5}, {"token": "c", "finish_reason": "stop"}]


def test_split_events_at_every_byte_boundary():
    stream = b": keep-alive\n\n" + b"".join(event_stream.event(e) for e in EVENTS) + event_stream.DONE
    for cut in range(len(stream) + 1):
        first, rest = event_stream.split_events(stream[:cut])
        second, left = event_stream.split_events(rest + stream[cut:])
        assert [orjson.loads(p) for p in first + second if p != b" [DONE]"] == EVENTS and left == b""


def test_gateway_reader_stops_after_the_last_choice_finishes_and_raises_error_events():
    parser = SseEvents(choices=1)
    stream = b"".join(event_stream.event(e) for e in EVENTS) + event_stream.event({"token": "late"})
    assert parser.feed(stream[:7]) == []
    assert parser.feed(stream[7:]) == EVENTS and parser.finished
    with pytest.raises(UpstreamError, match="boom"):
        SseEvents().feed(event_stream.event({"error": {"type": "server_error", "message": "boom"}}))


def test_envelope_writes_what_the_plain_writer_writes():
    fields = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m"}
    choices = [{"index": 0, "text": "hi", "finish_reason": None}]
    for usage in (None, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}):
        expected = event_stream.event({**fields, "choices": choices, "usage": usage})
        assert Envelope(**fields).chunk(choices, usage) == expected
