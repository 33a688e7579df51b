"""Client-facing routes: ask for a session, read it, end it."""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from hub.allocator import resolve_location
from hub.api.deps import HubDep, HubState, client_address, rate_limited_client
from hub.api.errors import error_responses
from shared.errors import RateLimited, StoreUnavailable
from shared.models import ErrorBody, Location, SessionConfig, SessionRequest

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"], responses=error_responses(422, 503))
#: GET and DELETE of a session that is not there.
_ENDED: dict[int | str, dict[str, object]] = {404: {
    "model": ErrorBody,
    "description": "`session_not_found`: no such session, or it has ended (also when an earlier attempt at this "
                   "DELETE, answered 503, ended it)."}}

SessionIdPath = Annotated[str, Path(max_length=200)]


def cloudfront_location(request: Request) -> Location | None:
    """CloudFront's viewer coordinates, when present and sane."""
    lat, lon = request.headers.get("cloudfront-viewer-latitude"), request.headers.get("cloudfront-viewer-longitude")
    if not lat or not lon:
        return None
    try:
        la, lo = float(lat), float(lon)
    except ValueError:
        return None
    if not (math.isfinite(la) and math.isfinite(lo) and -90 <= la <= 90 and -180 <= lo <= 180):
        return None
    return Location(lat=la, lon=lo)


async def _admit(request: Request, hub: HubState) -> None:
    """The per-client rate limit. Its refusals (and a store that cannot answer) are allocation outcomes too: an SRE
    reading ``fleet_allocations_total`` sees every request that got past validation."""
    settings, started = hub.settings, time.perf_counter()
    client = rate_limited_client(client_address(request, settings.trusted_proxies, settings.client_address_header))
    try:
        wait = await hub.store.take_token(client, settings.rate_limit_burst, settings.rate_limit_per_s)
    except StoreUnavailable:
        hub.metrics.count_allocation("error", started)
        raise
    if wait > 0:
        hub.metrics.count_allocation("rate_limited", started)
        raise RateLimited(wait)


@router.post("", response_model=SessionConfig, status_code=201,
             responses={200: {"model": SessionConfig, "description": "The session_key already had a live session."},
                        409: {"model": ErrorBody, "description": "The session_key's live session is another "
                                                                 "identity's (`session_key_in_use`)."},
                        **error_responses(400, 413, 429)})
async def create_session(request: Request, response: Response, hub: HubDep,
                         body: SessionRequest | None = None) -> SessionConfig:
    """Place a session on the best worker and return its config. 503 ``no_capacity`` with Retry-After when full;
    503 ``no_matching_worker``, without, when no live worker in the fleet has the ``labels`` asked for."""
    settings = hub.settings
    if settings.rate_limit_per_s > 0:
        await _admit(request, hub)
    req = body or SessionRequest()
    where = resolve_location(req.location, cloudfront_location(request), req.region, settings.default_region)
    config, created = await hub.allocator.create(req, where)
    response.status_code = 201 if created else 200
    return config


@router.get("/{session_id}", response_model=SessionConfig, responses=_ENDED)
async def get_session(session_id: SessionIdPath, hub: HubDep) -> SessionConfig:
    """The session as the hub holds it, without a token (only POST mints one) and with ``session_key`` null: the key
    joins the conversation, and only the one who chose it holds it."""
    return await hub.allocator.get(session_id)


@router.delete("/{session_id}", status_code=204, responses=_ENDED)
async def end_session(session_id: SessionIdPath, hub: HubDep) -> Response:
    """End the session: the worker is told to stop it, and its slot is freed once the worker answers (after at most
    a second; the stop goes on meanwhile). A 404 means it had ended already: treat it as done."""
    await hub.allocator.end(session_id)
    return Response(status_code=204)
