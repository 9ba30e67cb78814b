"""Server-sent events as adapterd writes them, in one place: every event is one `data: {json}` line and a
blank line; an OpenAI-shaped stream ends with `data: [DONE]`. The gateway's streams (`server/sse.py`) and the
worker's (`workers/service/app.py`) are written with these functions, and the gateway reads a worker's stream
back with `split_events` (it reads only what `event` writes: single-line `data:` events). Clients parse
streams with httpx-sse (the SDK). Torch-free and HTTP-free.

    event({"token": "a"})                       → b'data: {"token":"a"}\\n\\n'
    split_events(b'data: {"a":1}\\n\\ndata: {"b')  → ([b' {"a":1}'], b'data: {"b')
"""

from __future__ import annotations

import orjson

DATA = b"data: "  # an event's start
END = b"\n\n"  # an event's end
DONE = DATA + b"[DONE]" + END


def frame(data: bytes) -> bytes:
    """One event around an already-serialised single-line payload."""
    return DATA + data + END


def event(payload: dict | list) -> bytes:
    """One event carrying `payload` as compact JSON."""
    return DATA + orjson.dumps(payload) + END


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The `data:` payloads of the complete events at the start of `buffer` (other fields and comments are
    skipped), and the unfinished rest to prepend to the next read."""
    *complete, rest = buffer.split(END)
    return [block[5:] for block in complete if block.startswith(b"data:")], rest
