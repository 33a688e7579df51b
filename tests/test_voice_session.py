"""Voice sessions' ends and settings, with fake backends: a goodbye that hangs, the prod credential check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from shared.models import SessionDispatch
from shared.settings import MIN_PROD_SECRET_CHARS, Env
from worker.agent import client_audio_url
from worker.settings import WorkerSettings
from worker.voice.engine import VoiceEngine
from worker.voice.llm import CannedLLM, OpenAICompatLLM, build_llm
from worker.voice.settings import VoiceSettings
from worker.voice.transport_ws import AUDIO_PATH, verify_token

from .test_voice_pipeline import SILENCE, Events, FakeSTT, FakeWhisperModel, SlowTTS, noise, whisper_stt


class WedgedTransport:
    """A client that keeps its connection open and reads nothing: every send hangs until it is cut off."""

    def __init__(self) -> None:
        self.aborted = asyncio.Event()

    async def send_audio(self, pcm: bytes) -> None:
        await self.aborted.wait()
        raise ConnectionResetError

    async def send_event(self, event: dict[str, Any]) -> None:
        await self.aborted.wait()
        raise ConnectionResetError

    async def close(self, reason: str) -> None:
        await self.send_event({})

    def abort(self) -> None:
        self.aborted.set()


async def engine(**settings: Any) -> VoiceEngine:
    voice = VoiceEngine(VoiceSettings(llm_backend="canned", **settings), stt=FakeSTT(), llm=CannedLLM(),
                        tts=SlowTTS(0))
    await voice.start()
    return voice


def spec(session_id: str = "s1") -> SessionDispatch:
    return SessionDispatch(session_id=session_id, room="room-1", livekit_url="ws://lk", token="agent-token")


@pytest.fixture
async def voice() -> AsyncIterator[VoiceEngine]:
    e = await engine(session_max_s=0.2, close_timeout_s=0.1)
    yield e
    await e.aclose()


async def test_time_limit_frees_the_slot_though_the_goodbye_hangs(voice: VoiceEngine) -> None:
    ended: list[tuple[str, str]] = []
    await voice.start_session(spec(), lambda sid, reason: ended.append((sid, reason)))
    wedged = WedgedTransport()
    voice.sessions["s1"].attach(wedged)
    async with asyncio.timeout(3):
        while not ended:
            await asyncio.sleep(0.02)
    assert ended == [("s1", "time_limit")] and wedged.aborted.is_set()
    assert voice.stats().active_sessions == 0


async def test_stop_session_returns_though_the_goodbye_hangs(voice: VoiceEngine) -> None:
    voice.settings = voice.settings.model_copy(update={"session_max_s": 60})
    await voice.start_session(spec(), lambda *_: None)
    wedged = WedgedTransport()
    voice.sessions["s1"].attach(wedged)
    await asyncio.wait_for(voice.stop_session("s1"), 2)
    assert wedged.aborted.is_set() and "s1" not in voice.sessions


async def test_on_end_is_called_even_if_closing_fails(voice: VoiceEngine) -> None:
    ended: list[tuple[str, str]] = []
    await voice.start_session(spec(), lambda sid, reason: ended.append((sid, reason)))
    session = voice.sessions["s1"]

    async def broken(reason: str) -> None:
        raise RuntimeError("close failed")

    session.close = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await voice.end_session(session, "time_limit")
    assert ended == [("s1", "time_limit")]


async def test_stop_session_mid_utterance_does_not_transcribe_it(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Nobody will hear the transcript: the stop neither runs the shared whisper model nor waits for it."""
    voice = VoiceEngine(VoiceSettings(llm_backend="canned"), stt=whisper_stt(monkeypatch, tmp_path), llm=CannedLLM(),
                        tts=SlowTTS(0))
    await voice.start()
    await voice.start_session(spec(), lambda *_: None)
    conversation = voice.sessions["s1"].attach(Events())
    await conversation.feed(SILENCE[:3200] + noise(0.6))  # the user is mid-utterance
    await voice.stop_session("s1")
    assert FakeWhisperModel.transcriptions == 0
    await voice.aclose()


def test_prod_refuses_the_dev_livekit_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as refused:
        VoiceSettings(env="prod")
    problems = str(refused.value)
    assert "FLEET_VOICE_LIVEKIT_API_SECRET" in problems and "FLEET_VOICE_LIVEKIT_API_KEY" in problems
    with pytest.raises(ValidationError, match="LIVEKIT_API_SECRET"):
        VoiceSettings(env="prod", livekit_api_key="prodkey")
    monkeypatch.setenv("FLEET_ENV", "prod")  # the fleet's variable, not FLEET_VOICE_ENV
    with pytest.raises(ValidationError):
        VoiceSettings()
    monkeypatch.setenv("FLEET_VOICE_LIVEKIT_API_KEY", "prodkey")
    monkeypatch.setenv("FLEET_VOICE_LIVEKIT_API_SECRET", "a-long-production-secret-of-32-chars")
    assert VoiceSettings().env == "prod"


@pytest.mark.parametrize("secret", ["", "x", "s" * (MIN_PROD_SECRET_CHARS - 1)])
def test_prod_refuses_a_short_livekit_secret(secret: str) -> None:
    """Regression: prod refused only the dev secret, so an empty one (anyone can sign a token with it) passed. The
    hub holds LiveKit secrets to the same length."""
    with pytest.raises(ValidationError, match=f"LIVEKIT_API_SECRET must have at least {MIN_PROD_SECRET_CHARS}"):
        VoiceSettings(env=Env.PROD, livekit_api_key="prodkey", livekit_api_secret=SecretStr(secret))
    long_enough = SecretStr("s" * MIN_PROD_SECRET_CHARS)
    assert VoiceSettings(env=Env.PROD, livekit_api_key="prodkey", livekit_api_secret=long_enough).env is Env.PROD
    dev = VoiceSettings(env=Env.DEV, livekit_api_secret=SecretStr(secret))
    assert dev.livekit_api_secret.get_secret_value() == secret, "dev takes any secret"


def test_a_worker_no_client_can_reach_serves_no_audio_websocket_and_needs_no_livekit_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The deployed stack's workers sit in private subnets. With ``FLEET_VOICE_CLIENT_WEBSOCKET=false`` the engine
    registers no audio URL (so the hub hands none out) and serves no audio route, and prod starts without LiveKit
    credentials: the agent joins each room with the token the hub sent. Turning both ways in off is refused."""
    monkeypatch.setenv("FLEET_ENV", "prod")
    monkeypatch.setenv("FLEET_VOICE_CLIENT_WEBSOCKET", "false")
    monkeypatch.setenv("FLEET_VOICE_LIVEKIT_TRANSPORT", "true")
    private = VoiceEngine(VoiceSettings(llm_backend="canned"), stt=FakeSTT(), llm=CannedLLM(), tts=SlowTTS(0))
    assert private.settings.env is Env.PROD and private.settings.livekit_api_key == "devkey"
    assert private.client_audio_path is None and private.router() is None
    assert client_audio_url("http://10.0.0.5:8000", private.client_audio_path) is None
    with pytest.raises(ValidationError, match="FLEET_VOICE_LIVEKIT_TRANSPORT=true"):
        VoiceSettings(livekit_transport=False)
    monkeypatch.delenv("FLEET_ENV")
    monkeypatch.delenv("FLEET_VOICE_CLIENT_WEBSOCKET")
    public = VoiceEngine(VoiceSettings(llm_backend="canned"), stt=FakeSTT(), llm=CannedLLM(), tts=SlowTTS(0))
    assert public.client_audio_path == AUDIO_PATH and public.router() is not None


def test_the_engine_takes_the_workers_env(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = WorkerSettings(env="prod", worker_token="a-real-worker-token-of-32-characters")
    with pytest.raises(ValidationError):
        VoiceEngine.from_settings(worker, for_calibration=True)
    assert VoiceSettings(env="dev").livekit_api_key == "devkey"


def test_secrets_are_secret_str_and_still_work() -> None:
    settings = VoiceSettings(livekit_api_key="k", livekit_api_secret="livekit-s3cret", llm_api_key="llm-s3cret")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    with pytest.raises(ValidationError) as invalid:
        VoiceSettings(llm_api_key="llm-s3cret", max_tokens=0)
    assert "s3cret" not in str(invalid.value)
    llm = build_llm(settings)
    assert isinstance(llm, OpenAICompatLLM) and llm.api_key == "llm-s3cret"
    from livekit.api import AccessToken, VideoGrants

    grants = VideoGrants(room_join=True, room="r")
    token = AccessToken("k", "livekit-s3cret").with_identity("u").with_grants(grants).to_jwt()
    assert verify_token(token, "r", settings.livekit_api_key, settings.livekit_api_secret.get_secret_value()) == "u"


async def test_a_repeated_dispatch_of_a_running_session_changes_nothing(voice: VoiceEngine) -> None:
    """The hub may dispatch a session again (a retry): the running one, its history and its client stay, and its
    end is reported once."""
    voice.settings = voice.settings.model_copy(update={"session_max_s": 60})
    ended: list[tuple[str, str]] = []
    await voice.start_session(spec(), lambda sid, reason: ended.append((sid, reason)))
    first = voice.sessions["s1"]
    tasks = set(first.tasks)
    await voice.start_session(spec(), lambda sid, reason: ended.append((sid, reason)))
    assert voice.sessions["s1"] is first and first.tasks == tasks and voice.stats().active_sessions == 1
    await voice.end_session(first, "client_end")
    assert ended == [("s1", "client_end")]


async def test_a_session_ending_twice_frees_its_slot_once(voice: VoiceEngine) -> None:
    """The time limit and the unattended watchdog may both end a session: the worker hears of it once, or it would
    free the slot twice."""
    voice.settings = voice.settings.model_copy(update={"session_max_s": 60})
    ended: list[tuple[str, str]] = []
    await voice.start_session(spec(), lambda sid, reason: ended.append((sid, reason)))
    session = voice.sessions["s1"]
    await asyncio.gather(voice.end_session(session, "time_limit"), voice.end_session(session, "unattended"))
    assert ended == [("s1", "time_limit")] and voice.sessions == {}


async def test_vram_in_use_counts_every_running_session() -> None:
    stt, tts = FakeSTT(), SlowTTS(0)
    stt.model_mb, stt.per_stream_mb, tts.model_mb, tts.per_stream_mb = 1000, 100, 500, 50
    voice = VoiceEngine(VoiceSettings(llm_backend="canned"), stt=stt, llm=CannedLLM(), tts=tts)
    await voice.start()
    for n in range(3):
        await voice.start_session(spec(f"s{n}"), lambda *_: None)
    assert voice.stats().vram_used_mb == 1500 + 3 * 150
    await voice.aclose()
    assert voice.stats().vram_used_mb == 1500


async def test_closing_the_engine_closes_its_llm_client_and_a_start_loads_again() -> None:
    """The LLM client's connections are closed with the engine, and the engine is left as if never started."""
    closed: list[bool] = []

    class ClosingLLM(CannedLLM):
        async def aclose(self) -> None:
            closed.append(True)

    voice = VoiceEngine(VoiceSettings(llm_backend="canned"), stt=FakeSTT(), llm=ClosingLLM(), tts=SlowTTS(0))
    await voice.start()
    await voice.aclose()
    assert closed == [True] and voice.backends is None
    with pytest.raises(RuntimeError, match="not started"):
        await voice.start_session(spec(), lambda *_: None)


class StuckTransport(WedgedTransport):
    """A client that hangs on one step of the goodbye only: the ``session_end`` event, or the close."""

    def __init__(self, stuck_at: str) -> None:
        super().__init__()
        self.stuck_at = stuck_at

    async def send_event(self, event: dict[str, Any]) -> None:
        if self.stuck_at == "session_end":
            await super().send_event(event)

    async def close(self, reason: str) -> None:
        if self.stuck_at == "close":
            await super().send_event({})


@pytest.mark.parametrize("stuck_at", ["session_end", "close"])
async def test_a_client_stuck_on_either_step_of_the_goodbye_is_cut_off(voice: VoiceEngine, stuck_at: str) -> None:
    """Whichever step of the goodbye a client does not take in ``close_timeout_s``, its connection is dropped
    rather than left open."""
    voice.settings = voice.settings.model_copy(update={"session_max_s": 60})
    await voice.start_session(spec(), lambda *_: None)
    stuck = StuckTransport(stuck_at)
    voice.sessions["s1"].attach(stuck)
    await asyncio.wait_for(voice.stop_session("s1"), 2)
    assert stuck.aborted.is_set()


def test_a_refused_prod_configuration_does_not_print_its_secrets() -> None:
    """The refusal is logged wherever the worker's output goes: it names the problem, never the values given."""
    with pytest.raises(ValidationError) as refused:
        VoiceSettings(env=Env.PROD, livekit_api_key="prodkey", livekit_api_secret="short-s3cret",
                      llm_api_key="llm-s3cret")
    assert "LIVEKIT_API_SECRET" in str(refused.value) and "s3cret" not in str(refused.value)


def test_a_zero_llm_timeout_is_refused() -> None:
    """It would fail every turn before the LLM could answer."""
    with pytest.raises(ValidationError, match="llm_timeout_s"):
        VoiceSettings(llm_timeout_s=0)
