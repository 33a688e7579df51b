"""A bound on request bodies, for the hub's and the worker's HTTP APIs (pure ASGI: cheap on the hot path)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Answer 413 to bodies over ``max_bytes``, whether announced by Content-Length or streamed. Paths ending in
    one of ``larger_for``'s suffixes get that suffix's bound instead (a full worker's heartbeat)."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger_for: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.larger_for = tuple((larger_for or {}).items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        max_bytes = next((limit for suffix, limit in self.larger_for if path.endswith(suffix)), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send, max_bytes)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise _TooLarge(max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send, max_bytes)

    async def _reject(self, send: Send, max_bytes: int) -> None:
        body = json.dumps({"error": "body_too_large", "message": _limited_to(max_bytes)}, separators=(",", ":"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body.encode()})


def _limited_to(max_bytes: int) -> str:
    return f"request bodies are limited to {max_bytes} bytes"


class _TooLarge(HTTPException):
    """Raised mid-read; an HTTPException so the framework's body parser passes it through untouched (and the
    app's own handler may answer it first: the message is the same either way)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _limited_to(max_bytes))
