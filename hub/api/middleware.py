"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path); the body bound is shared.body_limit's."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Answer HEAD wherever GET is served (RFC 9110 §9.3.2): route it as a GET and send the headers only.

    FastAPI routes a GET route's HEAD to a 405; load balancers, uptime checks and curl -I send HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}  # Content-Length stays the GET's, as HEAD requires
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
