"""What hub and worker apps both need to know about their own routes."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp

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
