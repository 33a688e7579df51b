"""WebSocket transport: ``/sessions/{id}/audio``, PCM16 mono 16 kHz binary frames in, audio + JSON events out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from livekit.api import TokenVerifier

from worker.voice.audio import FRAME_BYTES, SAMPLE_RATE

if TYPE_CHECKING:
    from worker.voice.engine import VoiceEngine, VoiceSession
    from worker.voice.pipeline import Conversation

log = logging.getLogger(__name__)

#: The per-session audio WebSocket on the worker, announced to the hub at registration.
AUDIO_PATH = "/sessions/{session_id}/audio"

CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # a text frame that is not a JSON control message
CLOSE_INVALID = 1007  # a binary frame that is not whole PCM16 samples
CLOSE_POLICY = 1008  # missing/invalid token, a token for another room, or audio faster than real time
CLOSE_TOO_BIG = 1009
CLOSE_BUSY = 4409  # the session already has an audio connection
CLOSE_UNKNOWN_SESSION = 4404
MAX_FRAME_BYTES = 32_000  # one second of audio
MAX_TEXT_CHARS = 4096  # a control message is a few dozen characters
#: How fast a session's client may send audio: this multiple of real time, plus a backlog of ``AUDIO_BURST_S`` at
#: once (after a network stall, say). Each second of audio costs 50 VAD+STT steps on the worker's event loop, which
#: every session shares, and capacity is planned at real time; a client sending faster is cut off with 1008.
AUDIO_RATE_LIMIT = 1.2
AUDIO_BURST_S = 3.0
_BYTES_PER_S = SAMPLE_RATE * 2
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


class AudioAllowance:
    """A token bucket of seconds of audio: refills at ``rate`` times real time, holds at most ``burst_s``."""

    def __init__(self, rate: float = AUDIO_RATE_LIMIT, burst_s: float = AUDIO_BURST_S) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self._left = burst_s
        self._at = time.monotonic()

    def take(self, seconds: float) -> bool:
        """Spend ``seconds`` of audio if the allowance has them; False (nothing spent) if not."""
        now = time.monotonic()
        self._left = min(self.burst_s, self._left + (now - self._at) * self.rate)
        self._at = now
        if seconds > self._left:
            return False
        self._left -= seconds
        return True


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


async def _serve(ws: WebSocket, conversation: Conversation, allowance: AudioAllowance) -> tuple[int, str]:
    """Feed the client's frames until it ends, disconnects (code -1) or sends something malformed or too fast.

    Between 20 ms frames the event loop goes to the worker's other sessions: queued messages are received without
    a pause, and one second of audio is 50 steps of VAD+STT."""
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
            if not allowance.take(len(data) / _BYTES_PER_S):
                return CLOSE_POLICY, (f"audio faster than real time: at most {allowance.rate:g}x, "
                                      f"after a burst of {allowance.burst_s:g} s")
            for offset in range(0, len(data), FRAME_BYTES):
                await conversation.feed(data[offset : offset + FRAME_BYTES])
                await asyncio.sleep(0)
            continue
        text = msg.get("text") or ""
        if len(text) > MAX_TEXT_CHARS:
            return CLOSE_TOO_BIG, f"text frames must be at most {MAX_TEXT_CHARS} characters"
        try:
            control = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to parse ("[[[[…")
            control = None
        if not isinstance(control, dict):
            return CLOSE_UNSUPPORTED, "text frames must be JSON control messages"
        if control.get("type") == "end":
            return CLOSE_NORMAL, CLIENT_ENDED
        await asyncio.sleep(0)


def build_router(engine: VoiceEngine) -> APIRouter:
    router = APIRouter()
    # Per session, not per connection: reconnecting must not refill a flooding client's allowance.
    allowances: weakref.WeakKeyDictionary[VoiceSession, AudioAllowance] = weakref.WeakKeyDictionary()

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
            allowance = allowances.setdefault(session, AudioAllowance())
            code, reason = await _serve(ws, conversation, allowance)
        except (WebSocketDisconnect, RuntimeError):  # RuntimeError: the session was stopped and closed the socket
            code, reason = -1, "disconnected"
        finally:
            session.ws_attached = False
            await session.detach(conversation)
        if code == CLOSE_NORMAL:
            # The client's {"type": "end"}: the session is over, not just this connection; the worker frees the slot.
            await engine.end_session(session, reason)
            await transport.goodbye(code, reason)
        elif code >= 0:  # malformed or too fast: only this connection closes; the session goes on, no session_end
            await transport.close(reason, code)

    return router
