"""ASGI middleware that bounds request bodies on the stream: a declared Content-Length over the limit is
refused before anything reads the body, and every body (chunked or not) is counted as its chunks arrive,
so reading stops at the limit + one chunk. Used by the gateway and the worker (torch-free, starlette only).

Past the limit, `receive` raises `BodyTooLarge` (a 413 `HTTPException`: FastAPI's body parsing passes it
through to the app's error boundary); if it escapes the app before a response started, the middleware
answers with `refuse(limit)` itself."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"request body over {limit} bytes")
        self.limit = limit


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int], refuse: Callable[[int], ASGIApp]):
        """`limit_for(scope)`: the byte limit of this request; `refuse(limit)`: the 413 response."""
        self.app, self.limit_for, self.refuse = app, limit_for, refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await self.refuse(limit)(scope, receive, send)
                return
        received, started = 0, False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if started:
                raise
            await self.refuse(limit)(scope, receive, send)
