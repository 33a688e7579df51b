"""What hub and worker apps both need to know about their own routes."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp

from shared.errors import describe_http_error, http_error_code

_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def allowed_methods(app: ASGIApp, scope: MutableMapping[str, Any]) -> list[str]:
    """Every method some route serves at the request's path: a 405's ``Allow``.

    Starlette names only the first route that matches the path, but two routes share a path where routers
    differ (the hub's public POST and admin GET of ``/api/v1/sessions``, the worker's GET and POST ``/sessions``).
    Each method is probed with Starlette's own route matching, so included routers count too.
    """
    routes = getattr(getattr(app, "router", None), "routes", [])
    return [method for method in _METHODS
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)]


def framework_answer(app: ASGIApp, scope: MutableMapping[str, Any],
                     exc: HTTPException) -> tuple[str, str, dict[str, str]]:
    """The error code, message and headers of an answer the HTTP framework gives by itself (404, 405, 400...): a
    405 names every method of the path; a 404 for a path that has a route without its trailing slash says so (no
    redirect is made: behind a TLS-ending load balancer it pointed the client at http://)."""
    headers = dict(exc.headers or {})
    message = describe_http_error(str(exc.detail), exc.__cause__)
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(app, scope))
    path = scope.get("path", "")
    if exc.status_code == 404 and len(path) > 1 and path.endswith("/"):
        slashless = path.rstrip("/") or "/"
        if allowed_methods(app, {**scope, "path": slashless}):
            message = f"{message}: {path} has no route, {slashless} has (no trailing slash)"
    return http_error_code(exc.status_code), message, headers
