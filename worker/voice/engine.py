"""``VoiceEngine``: the worker's Engine for real-time voice conversations (VAD → STT → LLM → TTS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from shared.models import SessionDispatch
from worker.engine import EngineStats, SessionEnded, VramProfile
from worker.voice.calibration import VoiceLoadProbe
from worker.voice.llm import LLM, build_llm
from worker.voice.metrics import VoiceMetrics
from worker.voice.pipeline import Backends, Conversation, History, Transport
from worker.voice.settings import VoiceSettings
from worker.voice.stt import STT, build_stt
from worker.voice.transport_livekit import run_livekit
from worker.voice.transport_ws import AUDIO_PATH, build_router
from worker.voice.tts import TTS, build_tts

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_PRIMING_TEXT = "Hello, can you help me please? What is the weather like today?"


class VoiceSession:
    def __init__(self, spec: SessionDispatch, engine: VoiceEngine) -> None:
        self.spec = spec
        self.engine = engine
        self.started_at = time.monotonic()
        self.history = History(engine.settings.max_history_turns)
        self.conversations: set[Conversation] = set()
        self.ws_attached = False
        self.tasks: set[asyncio.Task[None]] = set()

    def attach(self, transport: Transport) -> Conversation:
        e = self.engine
        assert e.backends is not None, "start() first"
        conversation = Conversation(self.spec.session_id, e.backends, e.settings, transport, e.metrics, self.history)
        self.conversations.add(conversation)
        return conversation

    async def detach(self, conversation: Conversation) -> None:
        self.conversations.discard(conversation)
        await conversation.aclose()

    async def close(self, reason: str) -> None:
        for conversation in list(self.conversations):
            with contextlib.suppress(Exception):
                await conversation.transport.send_event({"type": "session_end", "reason": reason})
            await self.detach(conversation)
            await conversation.transport.close(reason)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self.tasks if t is not current), return_exceptions=True)


class VoiceEngine:
    name = "voice"
    client_audio_path: str | None = AUDIO_PATH

    def __init__(
        self,
        settings: VoiceSettings | None = None,
        *,
        stt: STT | None = None,
        llm: LLM | None = None,
        tts: TTS | None = None,
    ) -> None:
        self.settings = settings or VoiceSettings()
        s = self.settings
        self._stt = stt or build_stt(s)
        self._llm = llm or build_llm(s)
        self._tts = tts or build_tts(s)
        self.profile = VramProfile(
            model_mb=self._stt.model_mb + self._tts.model_mb,
            per_stream_mb=self._stt.per_stream_mb + self._tts.per_stream_mb,
        )
        self.backends: Backends | None = None
        self.metrics = VoiceMetrics()
        self.sessions: dict[str, VoiceSession] = {}
        self._router = build_router(self)

    @classmethod
    def from_settings(cls, _worker: WorkerSettings, *, for_calibration: bool = False) -> VoiceEngine:
        """From ``FLEET_VOICE_*``. For calibration: no LiveKit room to join, and the canned local responder
        unless an LLM is configured explicitly."""
        settings = VoiceSettings()
        if for_calibration:
            update: dict[str, Any] = {"livekit_transport": False}
            if not settings.llm_configured:
                update["llm_backend"] = "canned"
            settings = settings.model_copy(update=update)
        return cls(settings)

    @property
    def llm_name(self) -> str:
        """``openai``, ``bedrock`` or ``canned`` (the local fixed-reply responder of calibration)."""
        return self._llm.name

    @property
    def stage_latency_ms(self) -> dict[str, float]:
        """Recent mean latency per stage (vad, stt, llm first token/sentence, tts, e2e) for the worker to export."""
        return self.metrics.stage_latency_ms

    async def start(self) -> None:
        """Load every model once; a missing model file raises ``ModelMissing`` naming the path and setting."""
        if self.backends is not None:
            return
        await asyncio.to_thread(self._tts.load)
        priming = await self._tts.synthesize(_PRIMING_TEXT) if self._tts.name == "espeak" else None
        await asyncio.to_thread(self._stt.load, priming)
        self.backends = Backends(self._stt, self._llm, self._tts)

    async def start_session(self, spec: SessionDispatch, on_end: SessionEnded) -> None:
        if self.backends is None:
            raise RuntimeError("voice engine not started")
        if spec.session_id in self.sessions:
            return
        session = VoiceSession(spec, self)
        self.sessions[spec.session_id] = session
        self._spawn(session, self._time_limit(session, on_end))
        if self.settings.livekit_transport:
            self._spawn(session, self._livekit(session, on_end))

    def _spawn(self, session: VoiceSession, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    async def _time_limit(self, session: VoiceSession, on_end: SessionEnded) -> None:
        await asyncio.sleep(self.settings.session_max_s)
        await self._end(session, "time_limit", on_end)

    async def _livekit(self, session: VoiceSession, on_end: SessionEnded) -> None:
        spec = session.spec
        try:
            reason = await run_livekit(
                spec.livekit_url, spec.token, session.attach, session.detach, self.settings.livekit_connect_timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session ends; the worker tells the hub
            log.warning("voice session %s: LiveKit transport failed: %r", spec.session_id, exc)
            reason = "livekit_failed"
        await self._end(session, reason, on_end)  # the user left or the room closed: free the slot

    async def _end(self, session: VoiceSession, reason: str, on_end: SessionEnded) -> None:
        if self.sessions.pop(session.spec.session_id, None) is None:
            return
        await session.close(reason)
        on_end(session.spec.session_id, reason)

    async def stop_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            await session.close("stopped")

    def stats(self) -> EngineStats:
        return EngineStats(
            latency_ms=self.metrics.e2e_ms,
            error_rate=self.metrics.error_rate,
            active_sessions=len(self.sessions),
            vram_used_mb=self.profile.model_mb + self.profile.per_stream_mb * len(self.sessions)
            if self.profile.model_mb
            else 0,
        )

    def load_probe(self) -> VoiceLoadProbe:
        """Calibration load: simulated users speaking in a loop through the transport interface."""
        return VoiceLoadProbe(self)

    def router(self) -> APIRouter | None:
        return self._router

    async def aclose(self) -> None:
        for session_id in list(self.sessions):
            await self.stop_session(session_id)
        await self._llm.aclose()
        self.backends = None
