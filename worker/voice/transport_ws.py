"""WebSocket transport: ``/sessions/{id}/audio``, PCM16 mono 16 kHz binary frames in, audio + JSON events out."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from livekit.api import TokenVerifier

if TYPE_CHECKING:
    from worker.voice.engine import VoiceEngine
    from worker.voice.pipeline import Conversation

log = logging.getLogger(__name__)

#: The per-session audio WebSocket on the worker, announced to the hub at registration.
AUDIO_PATH = "/sessions/{session_id}/audio"

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # a text frame that is not a JSON control message
CLOSE_INVALID = 1007  # a binary frame that is not whole PCM16 samples
CLOSE_POLICY = 1008  # missing/invalid token, or a token for another room
CLOSE_TOO_BIG = 1009
CLOSE_BUSY = 4409  # the session already has an audio connection
CLOSE_UNKNOWN_SESSION = 4404
MAX_FRAME_BYTES = 32_000  # one second of audio


class WebSocketTransport:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send_audio(self, pcm: bytes) -> None:
        await self.ws.send_bytes(pcm)

    async def send_event(self, event: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(event))

    async def close(self, reason: str) -> None:
        with contextlib.suppress(Exception):  # already closed
            await self.ws.close(CLOSE_NORMAL, reason)


def _token(ws: WebSocket) -> str | None:
    auth = ws.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ws.query_params.get("token")


def verify_token(token: str | None, room: str, api_key: str, api_secret: str) -> str | None:
    """The participant identity if ``token`` is a valid LiveKit token to join ``room``, else None."""
    if not token:
        return None
    try:
        claims = TokenVerifier(api_key, api_secret).verify(token)
    except Exception:  # noqa: BLE001 - any decoding/signature/expiry failure is simply "not authorised"
        return None
    video = claims.video
    if video is None or video.room != room or not video.room_join:
        return None
    return claims.identity or ""


async def _serve(ws: WebSocket, conversation: Conversation) -> tuple[int, str]:
    """Feed the client's frames until it ends, disconnects (code -1) or sends something malformed."""
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            return -1, "disconnected"
        data = msg.get("bytes")
        if data is not None:
            if len(data) % 2:
                return CLOSE_INVALID, "audio frames must be whole PCM16 samples"
            if len(data) > MAX_FRAME_BYTES:
                return CLOSE_TOO_BIG, f"audio frames must be at most {MAX_FRAME_BYTES} bytes"
            await conversation.feed(data)
            continue
        try:
            control = json.loads(msg.get("text") or "")
        except ValueError:
            control = None
        if not isinstance(control, dict):
            return CLOSE_UNSUPPORTED, "text frames must be JSON control messages"
        if control.get("type") == "end":
            return CLOSE_NORMAL, "client ended"


def build_router(engine: VoiceEngine) -> APIRouter:
    router = APIRouter()

    @router.websocket(AUDIO_PATH)
    async def session_audio(ws: WebSocket, session_id: str) -> None:
        session = engine.sessions.get(session_id)
        if session is None:
            await ws.close(CLOSE_UNKNOWN_SESSION, "unknown session")
            return
        s = engine.settings
        if verify_token(_token(ws), session.spec.room, s.livekit_api_key, s.livekit_api_secret) is None:
            await ws.close(CLOSE_POLICY, "invalid token for this session's room")
            return
        if session.ws_attached:
            await ws.close(CLOSE_BUSY, "session already has an audio connection")
            return
        session.ws_attached = True  # taken before the first await, so a second connection meanwhile is refused
        try:
            await ws.accept()
        except (WebSocketDisconnect, RuntimeError, OSError):
            session.ws_attached = False
            return
        transport = WebSocketTransport(ws)
        conversation = session.attach(transport)
        try:
            await transport.send_event({"type": "ready", "session_id": session_id, "sample_rate": 16000})
            code, reason = await _serve(ws, conversation)
            if code < 0:
                return
        except WebSocketDisconnect:
            return
        except RuntimeError:  # the session was stopped and closed the socket under us
            return
        finally:
            session.ws_attached = False
            await session.detach(conversation)
        await transport.send_event({"type": "session_end", "reason": reason})
        await ws.close(code, reason)

    return router
