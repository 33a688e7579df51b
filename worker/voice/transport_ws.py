"""WebSocket transport: ``/sessions/{id}/audio``, PCM16 mono 16 kHz binary frames in, audio + JSON events out."""

from __future__ import annotations

import asyncio
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
CLIENT_ENDED = "client_ended"  # why a session ends when its client sends {"type": "end"}


def _socket_of(send: Any) -> asyncio.Transport | None:
    """The asyncio transport under an ASGI ``send`` callable, or None.

    ASGI has no way to drop a connection without a goodbye, and a goodbye is what a client that stopped reading
    never takes. The server's connection is found through the wrappers instead: Starlette's exception-handling
    closure holds uvicorn's protocol's bound ``send``, whose protocol holds the transport."""
    todo: list[Any] = [send]
    seen: set[int] = set()
    while todo and len(seen) < 32:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        transport = getattr(obj, "transport", None)
        if isinstance(transport, asyncio.Transport):
            return transport
        owner = getattr(obj, "__self__", None)
        if owner is not None:
            todo.append(owner)
        for cell in getattr(obj, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    todo.append(cell.cell_contents)
    return None


class WebSocketTransport:
    def __init__(self, ws: WebSocket, close_timeout_s: float = 2.0) -> None:
        self.ws = ws
        self.close_timeout_s = close_timeout_s

    async def send_audio(self, pcm: bytes) -> None:
        await self.ws.send_bytes(pcm)

    async def send_event(self, event: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(event))

    async def close(self, reason: str, code: int = CLOSE_NORMAL) -> None:
        """Send the close frame, waiting at most ``close_timeout_s`` for the client to take it, else cut it off."""
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.abort()
        except Exception:  # noqa: BLE001, S110 - already closed
            pass

    async def goodbye(self, code: int, reason: str) -> None:
        """``session_end`` then the close frame, each bounded like ``close``."""
        try:
            async with asyncio.timeout(self.close_timeout_s):
                await self.send_event({"type": "session_end", "reason": reason})
        except TimeoutError:
            self.abort()
            return
        except Exception:  # noqa: BLE001 - already gone
            return
        await self.close(reason, code)

    def abort(self) -> None:
        transport = _socket_of(getattr(self.ws, "_send", None))
        if transport is None:
            log.warning("cannot find the connection under this ASGI server to cut off a client that stopped reading")
            return
        transport.abort()


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
            return CLOSE_NORMAL, CLIENT_ENDED


def build_router(engine: VoiceEngine) -> APIRouter:
    router = APIRouter()

    @router.websocket(AUDIO_PATH)
    async def session_audio(ws: WebSocket, session_id: str) -> None:
        session = engine.sessions.get(session_id)
        if session is None:
            await ws.close(CLOSE_UNKNOWN_SESSION, "unknown session")
            return
        s = engine.settings
        secret = s.livekit_api_secret.get_secret_value()
        if verify_token(_token(ws), session.spec.room, s.livekit_api_key, secret) is None:
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
        transport = WebSocketTransport(ws, s.close_timeout_s)
        conversation = session.attach(transport)
        try:
            await transport.send_event({"type": "ready", "session_id": session_id, "sample_rate": 16000})
            code, reason = await _serve(ws, conversation)
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: the session was stopped and closed the socket
            code, reason = -1, "disconnected"
        finally:
            session.ws_attached = False
            await session.detach(conversation)
        if code == CLOSE_NORMAL:
            # The client's {"type": "end"}: the session is over, not just this connection; the worker frees the slot.
            await engine.end_session(session, reason)
        if code >= 0:
            await transport.goodbye(code, reason)

    return router
