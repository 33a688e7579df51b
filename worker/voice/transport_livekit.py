"""LiveKit transport: join the session's room as the agent, hear the user's audio, publish the reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.aio import cancel_and_wait
from worker.voice.audio import SAMPLE_RATE, resample
from worker.voice.pipeline import Conversation

log = logging.getLogger(__name__)


class LiveKitTransport:
    """Reply audio goes to a published track, events to the data channel (topic ``voice``)."""

    def __init__(self, room: Any, source: Any) -> None:
        self.room = room
        self.source = source

    async def send_audio(self, pcm: bytes) -> None:
        from livekit import rtc

        n = len(pcm) // 2
        frame = rtc.AudioFrame(pcm[: n * 2], SAMPLE_RATE, 1, n)
        await self.source.capture_frame(frame)

    async def send_event(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # events are best effort; audio is what matters
            await self.room.local_participant.publish_data(json.dumps(event), topic="voice")

    async def close(self, reason: str) -> None:
        return None  # the room is left when the session's LiveKit task is cancelled

    def abort(self) -> None:
        return None  # likewise: leaving the room is the LiveKit task's job


def to_pipeline_pcm(frame: Any) -> bytes:
    """PCM16 mono 16 kHz from an ``rtc.AudioFrame``, whatever rate and layout it arrived in."""
    pcm = bytes(frame.data.cast("B"))
    if frame.num_channels > 1:
        samples = np.frombuffer(pcm, dtype=np.int16).reshape(-1, frame.num_channels)
        pcm = samples.mean(axis=1).round().astype(np.int16).tobytes()
    return resample(pcm, frame.sample_rate, SAMPLE_RATE)


async def pump_track(track: Any, conversation: Conversation) -> None:
    """Feed one remote audio track into the conversation as 16 kHz mono.

    LiveKit is asked to resample to 16 kHz mono 20 ms frames; frames that still arrive in another format (a
    library version that ignores the request) are converted here rather than fed at the wrong rate."""
    from livekit import rtc

    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=20)
    try:
        async for event in stream:
            await conversation.feed(to_pipeline_pcm(event.frame))
    finally:
        await stream.aclose()


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("LiveKit audio pump %s failed: %s: %s", task.get_name(), type(exc).__name__, exc, exc_info=exc)


def _voice_rank(track: Any, publication: Any) -> int:
    """How surely a remote track is its participant's voice: 2 a microphone, 1 audio of no stated source (an SDK
    publisher that set none, the Python SDK's default), 0 anything else (video, screen-share audio)."""
    from livekit import rtc

    if getattr(track, "kind", None) != rtc.TrackKind.KIND_AUDIO:
        return 0
    source = getattr(publication, "source", rtc.TrackSource.SOURCE_UNKNOWN)
    if source == rtc.TrackSource.SOURCE_MICROPHONE:
        return 2
    return 1 if source == rtc.TrackSource.SOURCE_UNKNOWN else 0


def _sid(track: Any) -> str:
    return str(getattr(track, "sid", id(track)))


class _Microphone:
    """Pumps one user's voice into the conversation, one track at a time.

    The conversation is with one participant, as in LiveKit's own agents (RoomIO): the first whose voice is
    heard. Feeding, or mixing, every track into one VAD and STT would give them a second person's speech, or a
    second device's echo of the reply, as if it were the user's. The track heard stays until it goes (then the
    user's best remaining one is heard: a device change republishes the microphone) or one more surely the user's
    voice comes (a microphone after audio of no stated source); when the user leaves, the next participant's."""

    def __init__(self, room: Any, conversation: Conversation) -> None:
        self.room = room
        self.conversation = conversation
        self.user: str | None = None  # identity of the participant the conversation is with
        self._heard: tuple[str, int, asyncio.Task[None]] | None = None  # track sid, its rank, its pump
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribed(self, track: Any, publication: Any = None, participant: Any = None) -> None:
        rank = _voice_rank(track, publication)
        identity = getattr(participant, "identity", None)
        if rank == 0 or (self.user is not None and identity != self.user):
            return
        heard = self._heard if self._heard is not None and not self._heard[2].done() else None
        if heard is not None and heard[1] >= rank:
            return
        self.user = identity
        previous = heard[2] if heard is not None else None
        if previous is not None:
            previous.cancel()
        task = asyncio.create_task(self._pump_after(previous, track), name=f"pump-{_sid(track)}")
        self._heard = (_sid(track), rank, task)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def unsubscribed(self, track: Any, publication: Any = None, participant: Any = None) -> None:
        if self._heard is None or self._heard[0] != _sid(track):
            return
        self._heard[2].cancel()
        self._heard = None
        if participant is not None:
            self.hear_best_of(participant)

    def left(self, participant: Any) -> None:
        if self.user is None or getattr(participant, "identity", None) != self.user:
            return
        if self._heard is not None:
            self._heard[2].cancel()
        self._heard, self.user = None, None
        for other in list(self.room.remote_participants.values()):
            self.hear_best_of(other)
            if self._heard is not None:
                return

    def hear_best_of(self, participant: Any) -> None:
        """Hear ``participant``'s best published track, if the conversation may be with them."""
        for publication in list(participant.track_publications.values()):
            if publication.track is not None:
                self.subscribed(publication.track, publication, participant)

    async def _pump_after(self, previous: asyncio.Task[None] | None, track: Any) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # even while switching, one track at a time feeds the conversation
        await pump_track(track, self.conversation)

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)


#: Joins given up on while the SDK still connects, kept until they settle so that a late success can be left.
_abandoned_joins: set[asyncio.Task[None]] = set()


async def _leave_when_settled(room: Any, connecting: asyncio.Future[None], timeout_s: float) -> None:
    await asyncio.wait([connecting])
    if connecting.cancelled() or connecting.exception() is not None:
        return  # it failed: nothing was joined
    log.info("a LiveKit join given up on succeeded late; leaving the room")
    try:
        async with asyncio.timeout(timeout_s):
            await room.disconnect()
    except Exception as exc:  # noqa: BLE001
        log.warning("leaving the LiveKit room joined late failed: %s", type(exc).__name__)


async def _join(room: Any, url: str, token: str, timeout_s: float) -> None:
    """``room.connect`` bounded by ``timeout_s``, without leaving the SDK connecting behind our back.

    Cancelling the await would not stop the SDK: it connects natively, retrying (four attempts, each on two
    signal paths, ~2 s apart), and no API cancels that; a join that succeeded late would keep the agent in the
    room unseen. So the SDK is told the bound (each signal attempt gets half of it: its first attempt is over
    when we give up, and its retries end sooner), and a connect given up on runs on until it settles; a room it
    joined is then left."""
    from livekit import rtc

    connecting = asyncio.ensure_future(room.connect(url, token, rtc.RoomOptions(connect_timeout=timeout_s / 2)))
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.shield(connecting)
    except BaseException:
        if not connecting.done():
            leaving = asyncio.create_task(_leave_when_settled(room, connecting, timeout_s))
            _abandoned_joins.add(leaving)
            leaving.add_done_callback(_abandoned_joins.discard)
        raise


async def run_livekit(
    url: str,
    token: str,
    attach: Any,
    detach: Any,
    connect_timeout_s: float,
    room: Any = None,
    on_presence: Callable[[bool], None] | None = None,
) -> str:
    """Join, serve until the user leaves, the room closes or the task is cancelled; always leave.

    Returns why it ended: ``participant_left`` (the last other participant left) or ``room_disconnected``.
    ``on_presence(bool)`` hears whether anyone besides the agent is in the room, at join and on every change (the
    engine ends a session nobody joins). ``room`` may be injected (tests use a fake)."""
    from livekit import rtc

    room = room if room is not None else rtc.Room()
    await _join(room, url, token, connect_timeout_s)
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    conversation: Conversation = attach(LiveKitTransport(room, source))
    microphone = _Microphone(room, conversation)
    joined_with_users = bool(room.remote_participants)

    def end(reason: str) -> None:
        if not ended.done():
            ended.set_result(reason)

    def presence() -> None:
        if on_presence is not None:
            on_presence(bool(room.remote_participants))

    try:

        def on_participant_left(participant: Any = None, *_: Any) -> None:
            microphone.left(participant)
            presence()
            if not room.remote_participants:
                end("participant_left")

        # Handlers first, then publish: a user who leaves (or publishes) while the track is being published is
        # heard rather than missed.
        room.on("track_subscribed", microphone.subscribed)
        room.on("track_unsubscribed", microphone.unsubscribed)
        room.on("participant_connected", lambda *_: presence())
        room.on("participant_disconnected", on_participant_left)
        room.on("disconnected", lambda *_: end("room_disconnected"))
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", source)
        await room.local_participant.publish_track(track)
        presence()
        if joined_with_users and not room.remote_participants:
            end("participant_left")  # the user was here at join and left before the handlers could hear it
        for participant in list(room.remote_participants.values()):
            microphone.hear_best_of(participant)
        return await ended
    finally:
        await microphone.stop()
        await detach(conversation)
        try:  # leaving is best effort, and bounded: a stuck leave must not hold the session's end (and its slot)
            async with asyncio.timeout(connect_timeout_s):
                await room.disconnect()
        except Exception as exc:  # noqa: BLE001
            log.warning("leaving the LiveKit room failed: %s", type(exc).__name__)
        await source.aclose()
