"""LiveKit transport: join the session's room as the agent, hear the user's audio, publish the reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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


async def run_livekit(
    url: str, token: str, attach: Any, detach: Any, connect_timeout_s: float, room: Any = None
) -> str:
    """Join, serve until the user leaves, the room closes or the task is cancelled; always leave.

    Returns why it ended: ``participant_left`` (the last other participant left) or ``room_disconnected``.
    ``room`` may be injected (tests use a fake)."""
    from livekit import rtc

    room = room if room is not None else rtc.Room()
    await asyncio.wait_for(room.connect(url, token), connect_timeout_s)
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    pumps: dict[str, asyncio.Task[None]] = {}
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    conversation: Conversation = attach(LiveKitTransport(room, source))

    def end(reason: str) -> None:
        if not ended.done():
            ended.set_result(reason)

    try:
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", source)
        await room.local_participant.publish_track(track)

        def on_track(track: Any, *_: Any) -> None:
            key = str(getattr(track, "sid", id(track)))
            if getattr(track, "kind", None) == rtc.TrackKind.KIND_AUDIO and key not in pumps:
                task = asyncio.create_task(pump_track(track, conversation), name=f"pump-{key}")
                pumps[key] = task
                task.add_done_callback(_log_failure)
                task.add_done_callback(lambda done: pumps.pop(key) if pumps.get(key) is done else None)

        def on_unsubscribed(track: Any, *_: Any) -> None:
            task = pumps.pop(str(getattr(track, "sid", id(track))), None)
            if task is not None:
                task.cancel()

        def on_participant_left(*_: Any) -> None:
            if not room.remote_participants:
                end("participant_left")

        room.on("track_subscribed", on_track)
        room.on("track_unsubscribed", on_unsubscribed)
        room.on("participant_disconnected", on_participant_left)
        room.on("disconnected", lambda *_: end("room_disconnected"))
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    on_track(publication.track)
        return await ended
    finally:
        running = list(pumps.values())
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await detach(conversation)
        with contextlib.suppress(Exception):
            await room.disconnect()
        await source.aclose()
