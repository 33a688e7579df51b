"""Worker-facing routes: register, heartbeat, deregister. Bearer FLEET_WORKER_TOKEN, plus the per-worker secret.

Heartbeats come either as ``POST .../heartbeat`` or as messages on a WebSocket opened on the same URL: a worker
keeps one channel open and sends a ``Heartbeat`` JSON text message each interval; the hub answers each with a
``HeartbeatReply`` (or an ``ErrorBody`` when Redis is unavailable, the channel staying open). A heartbeat sent
with ``"ack": false`` is answered only when there is news: the hub holds another state than the one reported (an
SRE drain), the worker runs sessions the hub does not hold, or an error. The channel skips HTTP parsing, routing
and dependency solving per heartbeat, and unanswered heartbeats skip the reply, most of a heartbeat's hub CPU.
Close codes: 1003 binary message, 1007 invalid heartbeat, 1009 too big, 4403 wrong secret, 4404 unknown worker
(register again). A handshake without the worker token and secret is refused (HTTP 403).
"""

from __future__ import annotations

import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from hub.api.deps import HubDep, HubState, WorkerIdPath, require_worker
from hub.api.errors import error_responses
from shared.auth import bearer_token, digest, secret_matches
from shared.errors import StoreUnavailable, WorkerCredentialInvalid, WorkerUnknown, describe_problem
from shared.keys import WORKER_ID_PATTERN
from shared.models import (
    MAX_HEARTBEAT_BYTES,
    ErrorBody,
    Heartbeat,
    HeartbeatReply,
    RegistrationAccepted,
    WorkerRegistration,
)

log = logging.getLogger(__name__)

_WORKER_ID = re.compile(WORKER_ID_PATTERN)

router = APIRouter(prefix="/api/v1/workers", tags=["workers"], dependencies=[Depends(require_worker)],
                   responses=error_responses(400, 401, 403, 413, 422, 503))
#: The WebSocket channel authenticates in its own handshake (HTTPBearer does not apply to WebSockets).
channel_router = APIRouter(prefix="/api/v1/workers")

WorkerSecret = Annotated[str | None, Header(alias="X-Worker-Secret", max_length=256,
                                            description="The secret this worker's registration returned.")]


NewSecret = Annotated[str | None, Header(
    alias="X-Worker-New-Secret", min_length=32, max_length=256, pattern=r"^[\x21-\x7e]+$",
    description="A secret the worker chose for this registration (else the hub makes one). A retry with the same "
                "one, after an answer that never arrived, is the same registration: the worker is not locked out of "
                "an id whose new secret it never learned.")]


@router.post("", response_model=RegistrationAccepted, responses={409: {"model": ErrorBody}})
async def register_worker(body: WorkerRegistration, hub: HubDep, secret: WorkerSecret = None,
                          new_secret: NewSecret = None) -> RegistrationAccepted:
    """Register or re-register a worker. A live worker's id can only be taken again with its own secret."""
    return await hub.registry.register(body, secret, new_secret)


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


@channel_router.websocket("/{worker_id}/heartbeat")
async def heartbeat_channel(websocket: WebSocket, worker_id: str) -> None:
    """Heartbeats as messages on one long-lived WebSocket; see the module docstring for the protocol."""
    hub: HubState = websocket.app.state.hub
    token = bearer_token(websocket.headers.get("authorization"))
    secret = websocket.headers.get("x-worker-secret")
    if (not _WORKER_ID.fullmatch(worker_id) or not secret
            or not secret_matches(token, hub.settings.worker_token.get_secret_value())):
        await websocket.close(code=4401)  # before accept: the handshake is refused with HTTP 403
        return
    await websocket.accept()
    secret_digest = digest(secret)  # once per channel, not per heartbeat
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await websocket.close(code=1003, reason="heartbeats are JSON text messages")
                return
            if len(text) > MAX_HEARTBEAT_BYTES:  # as large as a full worker's, whatever bounds other bodies
                await websocket.close(code=1009, reason=f"a heartbeat is at most {MAX_HEARTBEAT_BYTES} bytes")
                return
            try:
                beat = Heartbeat.model_validate_json(text)
            except ValidationError as exc:
                problem = describe_problem(exc.errors()[0])
                await websocket.close(code=1007, reason=_close_reason(f"invalid heartbeat: {problem}"))
                return
            try:
                reply = await hub.registry.heartbeat(worker_id, secret, beat, secret_digest=secret_digest)
            except StoreUnavailable as exc:
                await websocket.send_text(ErrorBody(error=exc.code, message=exc.message).model_dump_json())
                continue
            except WorkerUnknown:
                await websocket.close(code=4404, reason="unknown worker: register again")
                return
            except WorkerCredentialInvalid:
                await websocket.close(code=4403, reason="the X-Worker-Secret does not match this worker")
                return
            if beat.ack or reply.stop_sessions or reply.state is not beat.state:
                await websocket.send_text(reply.model_dump_json())
    except WebSocketDisconnect:
        return


def _close_reason(text: str) -> str:
    """A close frame's reason is at most 123 bytes of UTF-8 (a longer one breaks the connection instead)."""
    return text.encode()[:123].decode(errors="ignore")
