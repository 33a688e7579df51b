"""Worker-facing routes: register, heartbeat, deregister. Bearer FLEET_WORKER_TOKEN, plus the per-worker secret."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Response

from hub.api.deps import HubDep, require_worker
from hub.errors import error_responses
from shared.keys import WORKER_ID_PATTERN
from shared.models import ErrorBody, Heartbeat, HeartbeatReply, RegistrationAccepted, WorkerRegistration

router = APIRouter(prefix="/api/v1/workers", tags=["workers"], dependencies=[Depends(require_worker)],
                   responses=error_responses(400, 401, 403, 413, 422, 503))

WorkerIdPath = Annotated[str, Path(pattern=WORKER_ID_PATTERN)]
WorkerSecret = Annotated[str | None, Header(alias="X-Worker-Secret", max_length=256,
                                            description="The secret this worker's registration returned.")]


@router.post("", response_model=RegistrationAccepted, responses={409: {"model": ErrorBody}})
async def register_worker(body: WorkerRegistration, hub: HubDep, secret: WorkerSecret = None) -> RegistrationAccepted:
    """Register or re-register a worker. A live worker's id can only be taken again with its own secret."""
    return await hub.registry.register(body, secret)


@router.post("/{worker_id}/heartbeat", response_model=HeartbeatReply, responses={404: {"model": ErrorBody}})
async def heartbeat(
    worker_id: WorkerIdPath, body: Heartbeat, hub: HubDep, secret: WorkerSecret = None
) -> HeartbeatReply:
    """Report load and running sessions; answers the state the hub holds (an SRE drain reaches the worker here)."""
    return await hub.registry.heartbeat(worker_id, secret, body)


@router.delete("/{worker_id}", status_code=204, responses={404: {"model": ErrorBody}})
async def deregister_worker(worker_id: WorkerIdPath, hub: HubDep, secret: WorkerSecret = None) -> Response:
    await hub.registry.deregister(worker_id, secret)
    return Response(status_code=204)
