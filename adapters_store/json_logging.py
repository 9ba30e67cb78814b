"""JSON log lines for every process role (gateway, worker, trainer), through python-json-logger: one JSON
object per line with `time`, `level`, `role`, `logger`, `message`, the current request's id (the
`X-Request-ID` the gateway accepted or made, carried to the worker) and whatever `extra=` fields a call
adds (a request's summary line: tenant, adapter, worker, tokens, TTFT, latency, status). Shared here
because every role imports this package and it imports no torch."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("adapterd_request_id", default=None)
_GOOD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def accept_request_id(given: str | None) -> str:
    """A caller's X-Request-ID if it is a sane token (≤ 128 of [A-Za-z0-9._:-]), else a new one."""
    if given and _GOOD_ID.match(given):
        return given
    return f"req-{uuid.uuid4().hex}"


class _Context(logging.Filter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


def configure(role: str, level: int = logging.INFO) -> None:
    """Replaces the root logger's handlers with one JSON handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{role}{name}{message}{request_id}", style="{",
                                       rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    handler.addFilter(_Context(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
