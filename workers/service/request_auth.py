"""The worker's door: an ASGI middleware that lets through only requests signed with the cluster secret
(`adapters_store.cluster_auth`), answering 401 in the JSON error shape to everything else. `GET /health` and
`GET /ready` stay open (liveness and readiness probes: they tell only that the process is up and ready). The
body is read (bounded) before the signature is checked, since the signature covers its hash, and then handed
on to the app unchanged."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters_store.cluster_auth import RequestVerifier, SignatureError
from adapters_store.error_shape import error_body

OPEN_ROUTES = frozenset({("GET", "/health"), ("GET", "/ready")})  # probes: they tell only up / ready
MAX_BODY_BYTES = 16 * 1024 * 1024  # a worker request is a prompt and parameters, never an upload


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = json.dumps(error_body(kind, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'AdapterdCluster realm="adapterd"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _path_qs(scope: Scope) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return (path + (b"?" + query if query else b"")).decode("latin-1")


class ClusterAuthMiddleware:
    def __init__(self, app: ASGIApp, verifier: RequestVerifier, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.verifier = verifier
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in OPEN_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.verifier.check_headers(headers)  # cheap refusals before reading any body
        except SignatureError as exc:
            await _refuse(send, 401, str(exc), "cluster_auth_required")
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            await _refuse(send, 413, f"request body over {self.max_body_bytes} bytes", "payload_too_large")
            return
        try:
            self.verifier.verify(scope["method"], _path_qs(scope), body, headers)
        except SignatureError as exc:
            await _refuse(send, 401, str(exc), "cluster_auth_required")
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then the client's later messages (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
