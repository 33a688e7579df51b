"""LiveKit transport: join the session's room as the agent, hear the user's audio, publish the reply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from worker.voice.audio import SAMPLE_RATE
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


async def pump_track(track: Any, conversation: Conversation) -> None:
    """Feed one remote audio track, resampled by LiveKit to 16 kHz mono 20 ms frames, into the conversation."""
    from livekit import rtc

    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=20)
    try:
        async for event in stream:
            await conversation.feed(bytes(event.frame.data.cast("B")))
    finally:
        await stream.aclose()


async def run_livekit(
    url: str, token: str, attach: Any, detach: Any, connect_timeout_s: float, room: Any = None
) -> None:
    """Join, serve until cancelled, always leave. ``room`` may be injected (tests use a fake)."""
    from livekit import rtc

    room = room if room is not None else rtc.Room()
    await asyncio.wait_for(room.connect(url, token), connect_timeout_s)
    source = rtc.AudioSource(SAMPLE_RATE, 1)
    pumps: set[asyncio.Task[None]] = set()
    conversation: Conversation = attach(LiveKitTransport(room, source))
    try:
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", source)
        await room.local_participant.publish_track(track)

        def on_track(track: Any, *_: Any) -> None:
            if getattr(track, "kind", None) == rtc.TrackKind.KIND_AUDIO:
                task = asyncio.create_task(pump_track(track, conversation))
                pumps.add(task)
                task.add_done_callback(pumps.discard)

        room.on("track_subscribed", on_track)
        for participant in room.remote_participants.values():
            for publication in participant.track_publications.values():
                if publication.track is not None:
                    on_track(publication.track)
        await asyncio.Event().wait()
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await detach(conversation)
        with contextlib.suppress(Exception):
            await room.disconnect()
        await source.aclose()
