"""Server-sent events framing for the gateway's streams."""

from __future__ import annotations

import json

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"


def event(payload: BaseModel | dict) -> bytes:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


def error_event(err: dict) -> bytes:
    return event(err)
