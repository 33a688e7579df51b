"""``VoiceEngine``: the worker's Engine for real-time voice conversations (VAD → STT → LLM → TTS)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from shared.keys import shown_session_id
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
    def __init__(self, spec: SessionDispatch, engine: VoiceEngine, on_end: SessionEnded) -> None:
        self.spec = spec
        self.engine = engine
        self.on_end = on_end
        self.history = History(engine.settings.max_history_turns)
        self.conversations: set[Conversation] = set()
        self.ws_attached = False
        self.tasks: set[asyncio.Task[None]] = set()
        # Who keeps the session attended: attached client conversations, and ``livekit`` while the room has a user.
        self._present: set[object] = set()
        self._presence_changed = asyncio.Event()  # set, then replaced, whenever the session gains/loses its last one

    @property
    def attended(self) -> bool:
        return bool(self._present)

    def presence(self, who: object, here: bool) -> None:
        """``who`` (a conversation, ``livekit``) came or went; the unattended watchdog hears of the change."""
        before = self.attended
        if here:
            self._present.add(who)
        else:
            self._present.discard(who)
        if self.attended != before:
            self._presence_changed.set()
            self._presence_changed = asyncio.Event()

    async def wait_presence_change(self) -> None:
        await self._presence_changed.wait()

    def attach(self, transport: Transport, *, client: bool = True) -> Conversation:
        """``client``: the transport is a client of its own (an audio WebSocket), so the session is attended while
        it is attached. The LiveKit agent's conversation is not: the room counts once a user is in it."""
        e = self.engine
        assert e.backends is not None, "start() first"
        conversation = Conversation(self.spec.session_id, e.backends, e.settings, transport, e.metrics, self.history)
        self.conversations.add(conversation)
        if client:
            self.presence(conversation, True)
        return conversation

    async def detach(self, conversation: Conversation) -> None:
        self.conversations.discard(conversation)
        self.presence(conversation, False)
        await conversation.aclose()

    async def close(self, reason: str) -> None:
        """Say goodbye to every client and stop every task. Each goodbye is bounded (``close_timeout_s``): a client
        that keeps its connection open but stopped reading is cut off rather than wedging the close."""
        for conversation in list(self.conversations):
            transport = conversation.transport
            if not await self._bounded(transport.send_event({"type": "session_end", "reason": reason})):
                transport.abort()
            await self.detach(conversation)  # cancels a turn that may be blocked sending to that client
            if not await self._bounded(transport.close(reason)):
                transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        await asyncio.gather(*(t for t in self.tasks if t is not current), return_exceptions=True)

    async def _bounded(self, goodbye: Coroutine[Any, Any, None]) -> bool:
        """Await one goodbye to a client for at most ``close_timeout_s``; False if the client did not take it."""
        timeout = self.engine.settings.close_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await goodbye
        except TimeoutError:
            log.warning("voice session %s: a client took no goodbye in %ss; cut off",
                        shown_session_id(self.spec.session_id), timeout)
            return False
        except Exception:  # the client is already gone; closing goes on
            log.debug("voice session %s: goodbye failed", self.spec.session_id, exc_info=True)
        return True


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
        if not s.client_websocket:
            self.client_audio_path = None  # no audio URL is registered, so the hub hands none out
        self._router = build_router(self) if s.client_websocket else None

    @classmethod
    def from_settings(cls, worker: WorkerSettings, *, for_calibration: bool = False) -> VoiceEngine:
        """From ``FLEET_VOICE_*``, in the worker's ``FLEET_ENV`` (prod refuses the dev LiveKit credentials), with the
        worker's VRAM overrides. For calibration: no LiveKit room to join, and the canned local responder unless an
        LLM is configured explicitly."""
        settings = VoiceSettings(env=worker.env)
        if for_calibration:
            update: dict[str, Any] = {"livekit_transport": False}
            if not settings.llm_configured:
                update["llm_backend"] = "canned"
            settings = settings.model_copy(update=update)
        engine = cls(settings)
        engine.profile = worker.vram_profile(engine.profile)
        return engine

    @property
    def llm_name(self) -> str:
        """``openai``, ``bedrock`` or ``canned`` (the local fixed-reply responder of calibration)."""
        return self._llm.name

    @property
    def stage_latency_ms(self) -> dict[str, float]:
        """Recent mean latency per stage (vad, stt, llm first token/sentence, tts, e2e) for the worker to export."""
        return self.metrics.stage_latency_ms

    @property
    def turn_errors(self) -> dict[str, int]:
        """Turns failed so far, by the backend stage that failed them (stt, llm, tts), for the worker to export."""
        return dict(self.metrics.errors_by_stage)

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
        session = VoiceSession(spec, self, on_end)
        self.sessions[spec.session_id] = session
        self._spawn(session, self._time_limit(session))
        self._spawn(session, self._unattended(session))
        if self.settings.livekit_transport:
            self._spawn(session, self._livekit(session))

    def _spawn(self, session: VoiceSession, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    async def _time_limit(self, session: VoiceSession) -> None:
        await asyncio.sleep(self.settings.session_max_s)
        await self.end_session(session, "time_limit")

    async def _unattended(self, session: VoiceSession) -> None:
        """End the session once it has had no client for ``unattended_s`` in a row: nobody connected, or the
        client went away and did not come back. Without this its slot would stay taken until the time limit."""
        grace = self.settings.unattended_s
        while True:
            if session.attended:
                await session.wait_presence_change()
                continue
            try:
                async with asyncio.timeout(grace):
                    await session.wait_presence_change()
            except TimeoutError:
                break
        await self.end_session(session, "unattended")

    async def _livekit(self, session: VoiceSession) -> None:
        spec = session.spec

        def attach(transport: Transport) -> Conversation:
            return session.attach(transport, client=False)  # the agent in the room is not a client; its users are

        try:
            reason = await run_livekit(
                spec.livekit_url, spec.token, attach, session.detach, self.settings.livekit_connect_timeout_s,
                on_presence=lambda here: session.presence("livekit", here),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the session ends; the worker tells the hub
            log.warning("voice session %s: LiveKit transport failed: %r", shown_session_id(spec.session_id), exc)
            reason = "livekit_failed"
        await self.end_session(session, reason)  # the user left or the room closed: free the slot

    async def end_session(self, session: VoiceSession, reason: str) -> None:
        """The session ends by itself (time limit, unattended, the client ended it, the room closed): close it and
        tell the worker, which frees the slot. ``on_end`` runs whatever happens to the close."""
        if self.sessions.pop(session.spec.session_id, None) is None:
            return
        try:
            await session.close(reason)
        finally:
            session.on_end(session.spec.session_id, reason)

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
