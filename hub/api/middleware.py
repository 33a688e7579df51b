"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path); the body bound is shared.body_limit's."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
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


class ClientRoutesCors:
    """CORS for the client routes only (``FLEET_CORS_ORIGINS``): ``POST {prefix}`` and ``GET``/``DELETE
    {prefix}/{id}``, so that a page of a listed origin may create, read and end sessions from the browser. Every other
    route answers no other origin, so a page can never drive it with a token it got hold of; that includes the SRE's
    session listing, ``GET {prefix}``, which shares the path of creation. No credentials: the client routes take
    none."""

    def __init__(self, app: ASGIApp, origins: list[str], prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        self.create = self._cors(app, origins, ["POST"])
        self.per_session = self._cors(app, origins, ["GET", "DELETE"])

    @staticmethod
    def _cors(app: ASGIApp, origins: list[str], methods: list[str]) -> CORSMiddleware:
        return CORSMiddleware(app, allow_origins=origins, allow_methods=methods, allow_headers=["Content-Type"],
                              expose_headers=["Retry-After"], max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(self.prefix + "/"):
            await self.per_session(scope, receive, send)
        elif scope["type"] == "http" and path == self.prefix and scope["method"] in ("POST", "OPTIONS"):
            await self.create(scope, receive, send)  # a preflight for any other method is refused there
        else:
            await self.app(scope, receive, send)
