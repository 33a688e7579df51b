"""The LiveKit transport with the livekit library faked at its boundary (AudioStream, AudioSource) and a fake room.

Real ``rtc.AudioFrame``s of synthesised speech at 48 kHz go in; the real voice engine (pocketsphinx, espeak-ng,
the canned responder) must hear them at 16 kHz, answer on the data channel and speak into the agent's track.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from livekit import rtc

from shared.models import SessionDispatch
from worker.voice.audio import FRAME_BYTES, SAMPLE_RATE, resample, rms
from worker.voice.engine import VoiceEngine
from worker.voice.llm import CannedLLM
from worker.voice.settings import VoiceSettings
from worker.voice.transport_livekit import LiveKitTransport, run_livekit
from worker.voice.tts import EspeakTTS

QUESTION = "What is the weather like in Paris today?"
TRACK_RATE = 48_000


class FakeTrack:
    def __init__(self, sid: str, pcm48: bytes, kind: Any = rtc.TrackKind.KIND_AUDIO) -> None:
        self.sid, self.pcm48, self.kind = sid, pcm48, kind


class FakeAudioStream:
    """``rtc.AudioStream``: yields the track's audio as real 20 ms ``rtc.AudioFrame``s, then stays open like a live
    track. Deliberately at 48 kHz whatever rate was asked for, as a track arrives before any resampling."""

    made: list[FakeAudioStream] = []

    def __init__(self, track: FakeTrack, **kwargs: Any) -> None:
        self.track, self.kwargs, self.closed = track, kwargs, False
        FakeAudioStream.made.append(self)

    async def __aiter__(self) -> AsyncIterator[rtc.AudioFrameEvent]:
        n = TRACK_RATE // 50
        pcm = self.track.pcm48
        for i in range(0, len(pcm) - n * 2 + 1, n * 2):
            yield rtc.AudioFrameEvent(rtc.AudioFrame(pcm[i : i + n * 2], TRACK_RATE, 1, n))
            await asyncio.sleep(0.002)  # faster than real time: the pipeline does not need the pacing
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


class RecordingSource:
    """A real ``rtc.AudioSource`` (the agent's track is created from it) whose captured frames are kept."""

    def __init__(self, sample_rate: int, num_channels: int) -> None:
        self.source = _AudioSource(sample_rate, num_channels)
        self.frames: list[rtc.AudioFrame] = []

        async def capture_frame(frame: rtc.AudioFrame) -> None:
            self.frames.append(frame)

        self.source.capture_frame = capture_frame  # type: ignore[method-assign]


_AudioSource = rtc.AudioSource


class FakeParticipant:
    def __init__(self) -> None:
        self.data: list[dict[str, Any]] = []
        self.tracks: list[Any] = []

    async def publish_data(self, payload: str, *, topic: str = "") -> None:
        self.data.append(json.loads(payload) | {"_topic": topic})

    async def publish_track(self, track: Any) -> None:
        self.tracks.append(track)


class Publication:
    def __init__(self, track: Any) -> None:
        self.track = track


class Remote:
    def __init__(self, *tracks: Any) -> None:
        self.track_publications = {str(i): Publication(t) for i, t in enumerate(tracks)}


class FakeRoom:
    def __init__(self, remote: dict[str, Remote] | None = None) -> None:
        self.local_participant = FakeParticipant()
        self.remote_participants = remote or {}
        self.handlers: dict[str, Any] = {}
        self.disconnected = False

    async def connect(self, url: str, token: str) -> None:
        return None

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    async def disconnect(self) -> None:
        self.disconnected = True

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.local_participant.data if e["type"] == kind]


@pytest.fixture
def sources(monkeypatch: pytest.MonkeyPatch) -> list[RecordingSource]:
    made: list[RecordingSource] = []

    def source(sample_rate: int, num_channels: int) -> rtc.AudioSource:
        made.append(RecordingSource(sample_rate, num_channels))
        return made[-1].source

    FakeAudioStream.made = []
    monkeypatch.setattr(rtc, "AudioStream", FakeAudioStream)
    monkeypatch.setattr(rtc, "AudioSource", source)
    return made


@pytest.fixture
async def engine() -> AsyncIterator[VoiceEngine]:
    voice = VoiceEngine(VoiceSettings(llm_backend="canned"), llm=CannedLLM("It is sunny in Paris."))
    await voice.start()
    yield voice
    await voice.aclose()


def speech16k() -> bytes:
    pcm = EspeakTTS().synthesize_sync(QUESTION) + bytes(SAMPLE_RATE * 2)  # one second of trailing silence
    return pcm[: len(pcm) // FRAME_BYTES * FRAME_BYTES]


async def wait_until(check: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def start(engine: VoiceEngine, room: FakeRoom, fed: list[bytes]) -> asyncio.Task[str]:
    """The session's LiveKit task, with every chunk the pipeline is fed recorded."""
    spec = SessionDispatch(session_id="lk-1", room="room-1", livekit_url="ws://lk", token="agent-token")
    await engine.start_session(spec, lambda *_: None)
    session = engine.sessions["lk-1"]

    def attach(transport: Any) -> Any:
        conversation = session.attach(transport)
        feed = conversation.feed

        async def spy(pcm: bytes) -> None:
            fed.append(pcm)
            await feed(pcm)

        conversation.feed = spy  # type: ignore[method-assign]
        return conversation

    return asyncio.create_task(run_livekit(spec.livekit_url, spec.token, attach, session.detach, 1.0, room=room))


async def test_subscribed_user_track_is_heard_at_16k_and_answered(engine: VoiceEngine,
                                                                  sources: list[RecordingSource]) -> None:
    """track_subscribed of the user's audio starts a pump; 48 kHz frames reach the pipeline as 16 kHz 20 ms
    frames equal to the original speech, and the reply comes back on the data channel and the agent's track."""
    pcm16 = speech16k()
    room = FakeRoom()
    fed: list[bytes] = []
    task = await start(engine, room, fed)
    await wait_until(lambda: "track_subscribed" in room.handlers)
    room.handlers["track_subscribed"](FakeTrack("TR_video", b"", rtc.TrackKind.KIND_VIDEO), None, None)
    room.handlers["track_subscribed"](FakeTrack("TR_user", resample(pcm16, SAMPLE_RATE, TRACK_RATE)), None, None)
    await wait_until(lambda: room.events("reply_end"))

    assert [s.track.sid for s in FakeAudioStream.made] == ["TR_user"]  # the video track is not pumped
    assert FakeAudioStream.made[0].kwargs == {"sample_rate": 16000, "num_channels": 1, "frame_size_ms": 20}
    assert {len(chunk) for chunk in fed} == {FRAME_BYTES}
    heard = np.frombuffer(b"".join(fed), dtype=np.int16).astype(float)
    original = np.frombuffer(pcm16, dtype=np.int16).astype(float)
    assert len(heard) == len(original)
    assert np.abs(heard - original).mean() < 0.05 * np.abs(original).mean()  # the same speech, at the right rate
    transcript = room.events("transcript")[0]["text"]
    assert all(word in transcript for word in ("weather", "paris", "today"))
    assert [e["text"] for e in room.events("reply_text")] == ["It is sunny in Paris."]
    assert {e["_topic"] for e in room.local_participant.data} == {"voice"}
    reply = b"".join(bytes(f.data.cast("B")) for f in sources[0].frames)
    assert {f.sample_rate for f in sources[0].frames} == {SAMPLE_RATE} and rms(reply) > 500
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert FakeAudioStream.made[0].closed and room.disconnected


async def test_user_leaving_ends_the_session(engine: VoiceEngine, sources: list[RecordingSource]) -> None:
    """A track already published at join is pumped; when the last participant leaves, the session ends."""
    room = FakeRoom({"user": Remote(FakeTrack("TR_user", bytes(TRACK_RATE * 2)))})
    ended: list[tuple[str, str]] = []
    spec = SessionDispatch(session_id="lk-2", room="room-2", livekit_url="ws://lk", token="agent-token")
    engine.settings = engine.settings.model_copy(update={"livekit_transport": True})
    import worker.voice.engine as engine_module

    async def fake_run(url: str, token: str, attach: Any, detach: Any, timeout: float, **kwargs: Any) -> str:
        return await run_livekit(url, token, attach, detach, timeout, room=room, **kwargs)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(engine_module, "run_livekit", fake_run)
    try:
        await engine.start_session(spec, lambda sid, reason: ended.append((sid, reason)))
        await wait_until(lambda: FakeAudioStream.made and "participant_disconnected" in room.handlers)
        assert FakeAudioStream.made[0].track.sid == "TR_user"
        room.handlers["participant_disconnected"](object())  # someone left, the user is still there
        await asyncio.sleep(0.05)
        assert not ended
        room.remote_participants.clear()
        room.handlers["participant_disconnected"](object())
        await wait_until(lambda: ended)
    finally:
        monkey.undo()
    assert ended == [("lk-2", "participant_left")]
    assert "lk-2" not in engine.sessions and room.disconnected and FakeAudioStream.made[0].closed


async def test_room_disconnect_ends_run_livekit(sources: list[RecordingSource]) -> None:
    room = FakeRoom()
    detached: list[Any] = []

    async def detach(conversation: Any) -> None:
        detached.append(conversation)

    task = asyncio.create_task(run_livekit("ws://lk", "tok", lambda _: "conversation", detach, 1.0, room=room))
    await wait_until(lambda: "disconnected" in room.handlers)
    room.handlers["disconnected"]("SERVER_SHUTDOWN")
    assert await asyncio.wait_for(task, 2) == "room_disconnected"
    assert detached == ["conversation"]


async def test_a_stuck_leave_does_not_hold_the_end(sources: list[RecordingSource]) -> None:
    class StuckLeave(FakeRoom):
        async def disconnect(self) -> None:
            await asyncio.sleep(60)

    room = StuckLeave()

    async def detach(conversation: Any) -> None:
        pass

    task = asyncio.create_task(run_livekit("ws://lk", "tok", lambda _: "conversation", detach, 0.2, room=room))
    await wait_until(lambda: "disconnected" in room.handlers)
    room.handlers["disconnected"]("SERVER_SHUTDOWN")
    assert await asyncio.wait_for(task, 2) == "room_disconnected"


class HangingRoom:
    """A room whose server never answers (a real failing connect can take 30 s)."""

    def __init__(self) -> None:
        self.disconnected = False

    async def connect(self, url: str, token: str) -> None:
        await asyncio.sleep(60)

    async def disconnect(self) -> None:
        self.disconnected = True


async def test_livekit_connect_is_bounded() -> None:
    attached: list[Any] = []
    with pytest.raises(TimeoutError):
        await run_livekit("ws://127.0.0.1:1", "tok", attached.append, None, 0.2, room=HangingRoom())
    assert attached == []


async def test_livekit_transport_publishes_audio_and_events() -> None:
    """The agent joins, publishes its voice track, sends audio through a real AudioSource, leaves on cancel."""
    room = FakeRoom()
    transports: list[LiveKitTransport] = []
    detached: list[Any] = []

    async def detach(conversation: Any) -> None:
        detached.append(conversation)

    def attach(transport: LiveKitTransport) -> str:
        transports.append(transport)
        return "conversation"

    task = asyncio.create_task(run_livekit("ws://lk", "tok", attach, detach, 1.0, room=room))
    while not transports:
        await asyncio.sleep(0.01)
    await transports[0].send_audio(b"\x10\x00" * 1600)
    await transports[0].send_event({"type": "transcript", "text": "hi"})
    assert room.local_participant.tracks and "track_subscribed" in room.handlers
    assert room.local_participant.data == [{"type": "transcript", "text": "hi", "_topic": "voice"}]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert room.disconnected and detached == ["conversation"]


class LeavingRoom(FakeRoom):
    """The user is in the room at join and leaves while the agent publishes its track."""

    def __init__(self, tell: bool) -> None:
        super().__init__({"user": Remote()})
        self.tell = tell  # whether the room reports the departure as an event (else only the room is empty after)
        self.local_participant.publish_track = self.leave_while_publishing  # type: ignore[method-assign]

    async def leave_while_publishing(self, track: Any) -> None:
        self.remote_participants.clear()
        if self.tell and "participant_disconnected" in self.handlers:
            self.handlers["participant_disconnected"](object())


@pytest.mark.parametrize("tell", [True, False])
async def test_a_user_who_leaves_while_the_agent_publishes_is_not_missed(sources: list[RecordingSource],
                                                                         tell: bool) -> None:
    room = LeavingRoom(tell)
    presence: list[bool] = []

    async def detach(conversation: Any) -> None:
        return None

    run = run_livekit("ws://lk", "tok", lambda _: "conversation", detach, 1.0, room=room, on_presence=presence.append)
    assert await asyncio.wait_for(run, 2) == "participant_left"
    assert presence and presence[-1] is False


async def livekit_session(engine: VoiceEngine, room: FakeRoom, ended: list[tuple[str, str]]) -> None:
    import worker.voice.engine as engine_module

    async def fake_run(url: str, token: str, attach: Any, detach: Any, timeout: float, **kwargs: Any) -> str:
        return await run_livekit(url, token, attach, detach, timeout, room=room, **kwargs)

    engine.settings = engine.settings.model_copy(update={"livekit_transport": True, "unattended_s": 0.3})
    spec = SessionDispatch(session_id="lk-3", room="room-3", livekit_url="ws://lk", token="agent-token")
    with pytest.MonkeyPatch.context() as monkey:
        monkey.setattr(engine_module, "run_livekit", fake_run)
        await engine.start_session(spec, lambda sid, reason: ended.append((sid, reason)))
        await asyncio.sleep(0.05)  # the LiveKit task has started with the fake


async def test_a_livekit_room_nobody_joins_ends_unattended(engine: VoiceEngine,
                                                          sources: list[RecordingSource]) -> None:
    room = FakeRoom()
    ended: list[tuple[str, str]] = []
    await livekit_session(engine, room, ended)
    await wait_until(lambda: ended, 3)
    assert ended == [("lk-3", "unattended")] and room.disconnected and "lk-3" not in engine.sessions


async def test_a_livekit_user_keeps_the_session_attended(engine: VoiceEngine, sources: list[RecordingSource]) -> None:
    """The agent alone in the room is no client; a user who joins later is, for as long as they stay."""
    room = FakeRoom()
    ended: list[tuple[str, str]] = []
    await livekit_session(engine, room, ended)
    room.remote_participants["user"] = Remote()
    room.handlers["participant_connected"](object())
    await asyncio.sleep(0.6)
    assert not ended and "lk-3" in engine.sessions
    room.remote_participants.clear()
    room.handlers["participant_disconnected"](object())
    await wait_until(lambda: ended, 3)
    assert ended == [("lk-3", "participant_left")]
