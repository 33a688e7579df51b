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


MICROPHONE = rtc.TrackSource.SOURCE_MICROPHONE


class FakeTrack:
    """A remote track; ``source`` is what its publication says (kept here to build the fake room in one line)."""

    def __init__(self, sid: str, pcm48: bytes, kind: Any = rtc.TrackKind.KIND_AUDIO, source: Any = MICROPHONE) -> None:
        self.sid, self.pcm48, self.kind, self.source = sid, pcm48, kind, source


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
        self.track, self.sid, self.source = track, f"PUB_{track.sid}", track.source


class Remote:
    def __init__(self, *tracks: Any, identity: str = "user") -> None:
        self.identity = identity
        self.track_publications = {f"PUB_{t.sid}": Publication(t) for t in tracks}


class FakeRoom:
    def __init__(self, remote: dict[str, Remote] | None = None) -> None:
        self.local_participant = FakeParticipant()
        self.remote_participants = remote or {}
        self.handlers: dict[str, Any] = {}
        self.disconnected = False

    async def connect(self, url: str, token: str, options: Any = None) -> None:
        return None

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    def publish(self, identity: str, track: FakeTrack) -> None:
        """A participant's track is subscribed (``track_subscribed``, as the SDK calls it)."""
        remote = self.remote_participants.setdefault(identity, Remote(identity=identity))
        remote.track_publications[f"PUB_{track.sid}"] = publication = Publication(track)
        self.handlers["track_subscribed"](track, publication, remote)

    def unpublish(self, identity: str, sid: str) -> None:
        remote = self.remote_participants[identity]
        publication = remote.track_publications.pop(f"PUB_{sid}")
        self.handlers["track_unsubscribed"](publication.track, publication, remote)

    def leave(self, identity: str) -> None:
        self.handlers["participant_disconnected"](self.remote_participants.pop(identity))

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
    room.publish("user", FakeTrack("TR_video", b"", rtc.TrackKind.KIND_VIDEO, rtc.TrackSource.SOURCE_CAMERA))
    room.publish("user", FakeTrack("TR_user", resample(pcm16, SAMPLE_RATE, TRACK_RATE)))
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


class SlowRoom:
    """A room whose connect settles only after the caller's deadline (a real failing one takes 14-35 s)."""

    def __init__(self, settles_after_s: float, succeeds: bool = True) -> None:
        self.settles_after_s, self.succeeds = settles_after_s, succeeds
        self.options: Any = None
        self.connect_cancelled = self.disconnected = False

    async def connect(self, url: str, token: str, options: Any = None) -> None:
        self.options = options
        try:
            await asyncio.sleep(self.settles_after_s)
        except asyncio.CancelledError:
            self.connect_cancelled = True
            raise
        if not self.succeeds:
            raise rtc.ConnectError("engine: signal failure: transport timed out")

    async def disconnect(self) -> None:
        self.disconnected = True


@pytest.mark.parametrize("gives_up", ["timeout", "cancelled"])
async def test_a_connect_given_up_on_is_left_once_it_settles(gives_up: str) -> None:
    """``wait_for`` would only abandon the Python await: the SDK goes on connecting (it retries natively, and
    nothing in its API stops that), and a join that succeeds late would leave the agent in the room. The SDK is
    told the bound (``RoomOptions.connect_timeout``), the connect is not cancelled, and the room it joins late is
    left."""
    room = SlowRoom(settles_after_s=2.0)  # well past the bound: a caller held until it settles is told apart
    attached: list[Any] = []
    started = asyncio.get_running_loop().time()
    run = asyncio.create_task(run_livekit("ws://127.0.0.1:1", "tok", attached.append, None, 0.3, room=room))
    if gives_up == "cancelled":  # the session is stopped while the agent joins
        await asyncio.sleep(0.1)
        run.cancel()
    with pytest.raises(TimeoutError if gives_up == "timeout" else asyncio.CancelledError):
        await run
    assert asyncio.get_running_loop().time() - started < 1.2  # the caller's bound (0.3 s) holds, not the connect's
    await wait_until(lambda: room.disconnected or room.connect_cancelled, 10)  # the connect settles meanwhile
    assert not room.connect_cancelled, "the connect was cancelled: a real SDK goes on connecting, unseen"
    await wait_until(lambda: room.disconnected, 2)
    assert isinstance(room.options, rtc.RoomOptions) and 0 < (room.options.connect_timeout or 0) <= 0.3
    assert attached == []


async def test_a_connect_that_fails_late_is_not_left() -> None:
    room = SlowRoom(settles_after_s=0.3, succeeds=False)
    with pytest.raises(TimeoutError):
        await run_livekit("ws://127.0.0.1:1", "tok", lambda _: None, None, 0.1, room=room)
    await asyncio.sleep(0.4)
    assert not room.connect_cancelled and not room.disconnected  # nothing was joined, nothing to leave


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


def pumped() -> list[str]:
    return [s.track.sid for s in FakeAudioStream.made]


async def test_only_the_users_microphone_is_heard(engine: VoiceEngine, sources: list[RecordingSource]) -> None:
    """Regression: every subscribed audio track was fed into the one conversation, 20 ms frames of each in turn,
    so a second participant's silent microphone (or the user's screen-share audio) cut the question into pieces
    ("what is the weather like in paris set a"). One microphone is heard: the first user's."""
    pcm16 = speech16k()
    user = Remote(FakeTrack("TR_mic", resample(pcm16, SAMPLE_RATE, TRACK_RATE)),
                  FakeTrack("TR_screen", bytes(len(pcm16) * 3), source=rtc.TrackSource.SOURCE_SCREENSHARE_AUDIO))
    listener = Remote(FakeTrack("TR_other", bytes(len(pcm16) * 3)), identity="listener")
    room = FakeRoom({"user": user, "listener": listener})
    fed: list[bytes] = []
    task = await start(engine, room, fed)
    await wait_until(lambda: FakeAudioStream.made)
    await asyncio.sleep(0.1)
    assert pumped() == ["TR_mic"]
    await wait_until(lambda: room.events("reply_end"))
    transcript = room.events("transcript")[0]["text"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(word in transcript for word in ("weather", "paris", "today")), transcript
    assert b"".join(fed) == pcm16[: len(b"".join(fed))]  # the user's speech, nothing interleaved


async def test_a_device_change_moves_to_the_new_microphone(engine: VoiceEngine,
                                                          sources: list[RecordingSource]) -> None:
    """A device change republishes the microphone: the new track is heard once the old one goes, never both at
    once; another participant's microphone is not heard meanwhile."""
    room = FakeRoom({"user": Remote(FakeTrack("TR_old", bytes(TRACK_RATE * 2)))})
    task = await start(engine, room, [])
    await wait_until(lambda: pumped() == ["TR_old"])
    room.publish("user", FakeTrack("TR_new", bytes(TRACK_RATE * 2)))
    room.publish("listener", FakeTrack("TR_listener", bytes(TRACK_RATE * 2)))
    await asyncio.sleep(0.05)
    assert pumped() == ["TR_old"]
    room.unpublish("user", "TR_old")
    await wait_until(lambda: pumped() == ["TR_old", "TR_new"])
    assert FakeAudioStream.made[0].closed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert all(stream.closed for stream in FakeAudioStream.made)


async def test_audio_of_unknown_source_is_heard_until_a_microphone_comes(engine: VoiceEngine,
                                                                         sources: list[RecordingSource]) -> None:
    """An SDK publisher that sets no source (the Python SDK's default) is still heard; a microphone is preferred,
    and when the user who is heard leaves, the next participant's microphone is."""
    room = FakeRoom({"bot": Remote(FakeTrack("TR_bot", bytes(TRACK_RATE * 2), source=rtc.TrackSource.SOURCE_UNKNOWN),
                                   identity="bot")})
    task = await start(engine, room, [])
    await wait_until(lambda: pumped() == ["TR_bot"])
    room.publish("bot", FakeTrack("TR_bot_mic", bytes(TRACK_RATE * 2)))
    await wait_until(lambda: pumped() == ["TR_bot", "TR_bot_mic"])
    room.publish("user", FakeTrack("TR_user", bytes(TRACK_RATE * 2)))
    await asyncio.sleep(0.05)
    assert pumped() == ["TR_bot", "TR_bot_mic"]  # another participant's microphone waits its turn
    room.leave("bot")
    await wait_until(lambda: pumped() == ["TR_bot", "TR_bot_mic", "TR_user"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_stereo_frames_are_heard_as_the_mean_of_their_channels() -> None:
    """A stereo track (an SDK that ignored the request for mono) is mixed down sample by sample, not cut or
    averaged across time."""
    from worker.voice.transport_livekit import to_pipeline_pcm

    n = SAMPLE_RATE // 50
    stereo = np.tile(np.array([1000, 3000], dtype=np.int16), n).tobytes()  # left 1000, right 3000
    mono = to_pipeline_pcm(rtc.AudioFrame(stereo, SAMPLE_RATE, 2, n))
    assert np.frombuffer(mono, dtype=np.int16).tolist() == [2000] * n


async def test_screen_share_audio_alone_is_not_heard(engine: VoiceEngine, sources: list[RecordingSource]) -> None:
    """A participant who shares a screen with sound but no microphone is not taken for the user's voice."""
    room = FakeRoom({"presenter": Remote(FakeTrack("TR_screen", bytes(TRACK_RATE * 2),
                                                   source=rtc.TrackSource.SOURCE_SCREENSHARE_AUDIO),
                                         identity="presenter")})
    task = await start(engine, room, [])
    await wait_until(lambda: "track_subscribed" in room.handlers)
    room.publish("user", FakeTrack("TR_user", bytes(TRACK_RATE * 2)))
    await wait_until(lambda: pumped() == ["TR_user"])
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_another_participant_leaving_does_not_interrupt_the_user(engine: VoiceEngine,
                                                                       sources: list[RecordingSource]) -> None:
    """Someone else leaves the room: the user's microphone stays heard, without a restart that would drop the
    utterance under way."""
    room = FakeRoom({"user": Remote(FakeTrack("TR_user", bytes(TRACK_RATE * 2))),
                     "listener": Remote(FakeTrack("TR_listener", bytes(TRACK_RATE * 2)), identity="listener")})
    task = await start(engine, room, [])
    await wait_until(lambda: pumped() == ["TR_user"])
    room.leave("listener")
    await asyncio.sleep(0.05)
    assert pumped() == ["TR_user"] and not FakeAudioStream.made[0].closed
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
