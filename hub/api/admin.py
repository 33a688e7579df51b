"""SRE-facing routes: inspect and steer the registry. Bearer FLEET_ADMIN_TOKEN."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from hub.allocator import resolve_location
from hub.api.deps import HubDep, HubState, WorkerIdPath, require_admin
from hub.api.errors import error_responses
from hub.livekit import choose_deployment
from hub.placement import describe_labels
from shared.keys import WORKER_ID_PATTERN
from shared.models import (
    DEFAULT_PAGE,
    MAX_PAGE,
    WORKER_CURSOR_PATTERN,
    Candidate,
    ErrorBody,
    FleetCapacity,
    KnownRegion,
    LabelMap,
    Location,
    Policy,
    RouteExplanation,
    ScoreFactors,
    SessionList,
    WorkerList,
    WorkerView,
)

router = APIRouter(prefix="/api/v1", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=error_responses(401, 422, 503))

PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="The most items the page holds.")]


@router.get("/workers", response_model=WorkerList)
async def list_workers(hub: HubDep, region: Annotated[str | None, Query(max_length=32)] = None,
                       state: Annotated[str | None, Query(pattern="^(ready|draining|stale)$")] = None,
                       limit: PageLimit = DEFAULT_PAGE,
                       cursor: Annotated[str | None, Query(pattern=WORKER_CURSOR_PATTERN, description=(
                           "The `next_cursor` of the page before."))] = None) -> WorkerList:
    """Workers by region, then id, a page at a time: follow `next_cursor` until it is null."""
    workers, next_cursor = await hub.registry.worker_page(region=region, state=state, limit=limit, cursor=cursor)
    return WorkerList(workers=workers, next_cursor=next_cursor)


@router.get("/workers/{worker_id}", response_model=WorkerView, responses={404: {"model": ErrorBody}})
async def get_worker(worker_id: WorkerIdPath, hub: HubDep) -> WorkerView:
    return await hub.registry.view(worker_id)


@router.post("/workers/{worker_id}/drain", response_model=WorkerView, responses={404: {"model": ErrorBody}})
async def drain_worker(worker_id: WorkerIdPath, hub: HubDep) -> WorkerView:
    """No new sessions go to this worker; running ones finish. The worker learns it on its next heartbeat."""
    return await hub.registry.set_drain(worker_id, True)


@router.post("/workers/{worker_id}/resume", response_model=WorkerView, responses={404: {"model": ErrorBody}})
async def resume_worker(worker_id: WorkerIdPath, hub: HubDep) -> WorkerView:
    return await hub.registry.set_drain(worker_id, False)


@router.post("/workers/{worker_id}/forget", status_code=204, responses={404: {"model": ErrorBody},
                                                                        409: {"model": ErrorBody}})
async def forget_worker(worker_id: WorkerIdPath, hub: HubDep) -> Response:
    """Remove a worker that stopped heartbeating (its instance is gone) and what it held, before retention would.
    Refused (409 ``worker_alive``) while the worker is live: it would register again at its next heartbeat."""
    await hub.registry.forget(worker_id)
    return Response(status_code=204)


@router.get("/fleet", response_model=FleetCapacity)
async def fleet_capacity(hub: HubDep) -> FleetCapacity:
    """Capacity per region: live workers, max, used and free streams."""
    return await hub.registry.capacity()


@router.get("/sessions", response_model=SessionList, responses={404: {"model": ErrorBody}})
async def list_sessions(hub: HubDep, worker_id: Annotated[str | None, Query(pattern=WORKER_ID_PATTERN)] = None,
                        region: Annotated[str | None, Query(max_length=32)] = None,
                        limit: PageLimit = DEFAULT_PAGE,
                        cursor: Annotated[str | None, Query(pattern=WORKER_ID_PATTERN, description=(
                            "The `next_cursor` of the page before."))] = None) -> SessionList:
    """Sessions a page at a time, worker by worker (oldest first within a page): follow `next_cursor` until it is
    null. A page may hold fewer than `limit` sessions and still have a next one."""
    sessions, next_cursor = await hub.registry.session_page(region=region, worker_id=worker_id, limit=limit,
                                                            cursor=cursor)
    return SessionList(sessions=sessions, next_cursor=next_cursor)


@router.get("/route/explain", response_model=RouteExplanation)
async def explain_route(
    hub: HubDep,
    lat: Annotated[float | None, Query(ge=-90, le=90, allow_inf_nan=False)] = None,
    lon: Annotated[float | None, Query(ge=-180, le=180, allow_inf_nan=False)] = None,
    region: Annotated[KnownRegion | None, Query()] = None,
    policy: Policy | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    label: Annotated[list[str] | None, Query(max_length=32, description="`key=value`, as in a session request's "
                                                                         "labels; repeat for several.")] = None,
) -> RouteExplanation:
    """The ranked candidates for a user here, with every factor of their score: why this worker."""
    if (lat is None) != (lon is None):  # half a location is a typo, not "use the default region"
        raise RequestValidationError([{"loc": ("query", "lon" if lon is None else "lat"), "type": "missing",
                                       "msg": "lat and lon are given together"}])
    given = Location(lat=lat, lon=lon) if lat is not None and lon is not None else None
    where = resolve_location(given, None, region, hub.settings.default_region)
    labels = _labels(label or [])
    await hub.board.refresh(if_older_than_s=0.5)
    loc = where.location
    ranked = hub.board.rank(loc.lat, loc.lon, labels, policy=policy, limit=limit, explain=True)
    near = {id(r) for r in hub.board.near_best(ranked)}
    livekit = None
    if ranked:
        head = ranked[0].entry
        livekit = choose_deployment(hub.settings.livekit_deployments, (loc.lat, loc.lon), (head.lat, head.lon)).region
    return RouteExplanation(
        location=loc, location_source=where.source, policy=policy or hub.settings.policy, livekit_region=livekit,
        candidates=[
            Candidate(worker_id=r.entry.worker_id, region=r.entry.region, score=round(r.score, 6),
                      used_streams=r.entry.used, max_streams=r.entry.max_streams,
                      factors=ScoreFactors(distance_km=round(r.factors.distance_km, 1),
                                           rtt_ms=round(r.factors.rtt_ms, 2), distance=round(r.factors.distance, 6),
                                           load=round(r.factors.load, 6), latency=round(r.factors.latency, 6),
                                           capacity=round(r.factors.capacity, 6)),
                      near_best=id(r) in near)
            for r in ranked
        ],
        note=None if ranked else _why_no_candidate(hub, labels),
    )


def _why_no_candidate(hub: HubState, labels: dict[str, str]) -> str:
    """What a session request here would be answered, and why (labels first: no worker at all has them either)."""
    if labels and not hub.board.carries(labels):
        return f"no live worker has the labels {describe_labels(labels)} (no_matching_worker)"
    if not hub.board.entries:
        return "no worker is registered (no_capacity)"
    return "every worker that could take the session is full, draining or stale (no_capacity)"


_LABELS: TypeAdapter[dict[str, str]] = TypeAdapter(LabelMap)


def _labels(pairs: list[str]) -> dict[str, str]:
    """``key=value`` query values as a session request's label map (same rules), or a 422."""
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise RequestValidationError([{"loc": ("query", "label"), "msg": "a label is key=value",
                                           "type": "value_error"}])
        if key in raw:  # a query repeats keys on purpose; a second value is not silently the only one
            raise RequestValidationError([{"loc": ("query", "label", key), "msg": "a label is given once",
                                           "type": "value_error"}])
        raw[key] = value
    try:
        return _LABELS.validate_python(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", "label", *e["loc"])} for e in exc.errors()]) from None
