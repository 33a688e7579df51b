"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from hub.api.deps import HubDep
from hub.api.errors import error_response
from shared.errors import StoreUnavailable

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Redis is unreachable."}})
async def ready(hub: HubDep) -> Response:
    """The hub can reach Redis and so serve requests."""
    try:
        await hub.store.ping()
    except StoreUnavailable as exc:
        return error_response(503, exc.code, exc.message, retry_after_s=1)
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", response_class=Response)
async def metrics(hub: HubDep, request: Request) -> Response:
    """Prometheus text, under the plain path only: the load balancer's rule that keeps ``/metrics`` inside matches
    the path as sent, so a percent-encoded one (``/%6detrics``), which the server decodes, must not serve it."""
    raw_path: bytes = request.scope.get("raw_path") or _METRICS_PATH
    if raw_path.split(b"?", 1)[0] != _METRICS_PATH:  # some servers keep the query in raw_path
        return error_response(404, "not_found", "Not Found")
    return Response(hub.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


_METRICS_PATH = b"/metrics"
