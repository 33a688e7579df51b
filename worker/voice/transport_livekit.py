"""LiveKit transport: join the session's room as the agent, hear the user's audio, publish the reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

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
    if not task.cancelled() and task.exception() is not None:
        log.warning("LiveKit audio pump %s failed: %r", task.get_name(), task.exception())


class _Pumps:
    """One audio pump per subscribed remote audio track, keyed by track sid."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def subscribed(self, track: Any, *_: Any) -> None:
        from livekit import rtc

        key = str(getattr(track, "sid", id(track)))
        if getattr(track, "kind", None) == rtc.TrackKind.KIND_AUDIO and key not in self.tasks:
            task = asyncio.create_task(pump_track(track, self.conversation), name=f"pump-{key}")
            self.tasks[key] = task
            task.add_done_callback(_log_failure)
            task.add_done_callback(lambda done: self.tasks.pop(key) if self.tasks.get(key) is done else None)

    def unsubscribed(self, track: Any, *_: Any) -> None:
        task = self.tasks.pop(str(getattr(track, "sid", id(track))), None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        running = list(self.tasks.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


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
    await asyncio.wait_for(room.connect(url, token), connect_timeout_s)
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    conversation: Conversation = attach(LiveKitTransport(room, source))
    pumps = _Pumps(conversation)
    joined_with_users = bool(room.remote_participants)

    def end(reason: str) -> None:
        if not ended.done():
            ended.set_result(reason)

    def presence() -> None:
        if on_presence is not None:
            on_presence(bool(room.remote_participants))

    try:

        def on_participant_left(*_: Any) -> None:
            presence()
            if not room.remote_participants:
                end("participant_left")

        # Handlers first, then publish: a user who leaves (or publishes) while the track is being published is
        # heard rather than missed.
        room.on("track_subscribed", pumps.subscribed)
        room.on("track_unsubscribed", pumps.unsubscribed)
        room.on("participant_connected", lambda *_: presence())
        room.on("participant_disconnected", on_participant_left)
        room.on("disconnected", lambda *_: end("room_disconnected"))
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", source)
        await room.local_participant.publish_track(track)
        presence()
        if joined_with_users and not room.remote_participants:
            end("participant_left")  # the user was here at join and left before the handlers could hear it
        for participant in list(room.remote_participants.values()):
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    pumps.subscribed(publication.track)
        return await ended
    finally:
        await pumps.stop()
        await detach(conversation)
        try:  # leaving is best effort, and bounded: a stuck leave must not hold the session's end (and its slot)
            await asyncio.wait_for(room.disconnect(), connect_timeout_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("leaving the LiveKit room failed: %s", type(exc).__name__)
        await source.aclose()
