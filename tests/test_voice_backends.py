"""Voice engine backends without the WebSocket: Bedrock (botocore Stubber), missing models, LiveKit transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from worker.voice.engine import VoiceEngine
from worker.voice.errors import BackendError, ModelMissing
from worker.voice.llm import BedrockLLM
from worker.voice.pipeline import sentences
from worker.voice.settings import VoiceSettings
from worker.voice.stt import WhisperSTT
from worker.voice.transport_livekit import LiveKitTransport, run_livekit
from worker.voice.tts import ChatterboxTTS

SYSTEM = "Be brief."
HISTORY = [{"role": "user", "content": "hello"}]
EXPECTED = {
    "modelId": "anthropic.claude-3-haiku",
    "system": [{"text": SYSTEM}],
    "messages": [{"role": "user", "content": [{"text": "hello"}]}],
    "inferenceConfig": {"maxTokens": 64},
}


class EventStreamStubber(Stubber):  # type: ignore[misc]
    """Stubber validates requests as usual; a ConverseStream answer is an event stream, which it cannot check."""

    def _validate_response(self, shape: Any, response: Any) -> None:
        return None


def bedrock() -> tuple[BedrockLLM, Stubber]:
    client = boto3.client("bedrock-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    return BedrockLLM("anthropic.claude-3-haiku", max_tokens=64, client=client), EventStreamStubber(client)


async def test_bedrock_converse_stream_yields_text() -> None:
    llm, stub = bedrock()
    events = [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": "Hello there. "}, "contentBlockIndex": 0}},
        {"contentBlockDelta": {"delta": {"text": "How can I help?"}, "contentBlockIndex": 0}},
        {"messageStop": {"stopReason": "end_turn"}},
    ]
    stub.add_response("converse_stream", {"stream": events}, EXPECTED)
    with stub:
        out = [s async for s in sentences(llm.stream(SYSTEM, HISTORY))]
    assert out == ["Hello there.", "How can I help?"]
    stub.assert_no_pending_responses()


async def test_bedrock_error_is_a_backend_error() -> None:
    llm, stub = bedrock()
    stub.add_client_error("converse_stream", "ThrottlingException", "slow down", expected_params=EXPECTED)
    with stub, pytest.raises(BackendError) as err:
        async for _ in llm.stream(SYSTEM, HISTORY):
            pass
    assert err.value.stage == "llm" and "ThrottlingException" in str(err.value)


async def test_sentences_split_streamed_text() -> None:
    async def chunks() -> AsyncIterator[str]:
        for c in ["Hi", " there! How", " are you? Fine", "\nthanks"]:
            yield c

    assert [s async for s in sentences(chunks())] == ["Hi there!", "How are you?", "Fine", "thanks"]


async def test_missing_models_fail_at_start_naming_path_and_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    engine = VoiceEngine(VoiceSettings(whisper_model_dir=missing))
    with pytest.raises(ModelMissing) as err:
        await engine.start()
    assert str(missing) in str(err.value) and "FLEET_VOICE_WHISPER_MODEL_DIR" in str(err.value)
    with pytest.raises(ModelMissing, match="FLEET_VOICE_TTS_MODEL_DIR"):
        await VoiceEngine(VoiceSettings(tts_backend="chatterbox", tts_model_dir=missing)).start()
    with pytest.raises(ModelMissing, match="FLEET_VOICE_STT_CORPUS_FILE"):
        VoiceEngine(VoiceSettings(stt_corpus_file=missing))


def test_profile_aggregates_backend_vram(tmp_path: Path) -> None:
    assert VoiceEngine(VoiceSettings()).profile.model_mb == 0
    gpu = VoiceEngine(VoiceSettings(tts_backend="chatterbox", whisper_model_dir=tmp_path))
    assert gpu.profile.model_mb == WhisperSTT.model_mb + ChatterboxTTS.model_mb
    assert gpu.profile.per_stream_mb == WhisperSTT.per_stream_mb + ChatterboxTTS.per_stream_mb


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


class FakeParticipant:
    def __init__(self) -> None:
        self.data: list[tuple[str, str]] = []
        self.tracks: list[Any] = []

    async def publish_data(self, payload: str, *, topic: str = "") -> None:
        self.data.append((topic, payload))

    async def publish_track(self, track: Any) -> None:
        self.tracks.append(track)


class FakeRoom:
    def __init__(self) -> None:
        self.local_participant = FakeParticipant()
        self.remote_participants: dict[str, Any] = {}
        self.handlers: dict[str, Any] = {}
        self.disconnected = False

    async def connect(self, url: str, token: str) -> None:
        return None

    def on(self, event: str, handler: Any) -> None:
        self.handlers[event] = handler

    async def disconnect(self) -> None:
        self.disconnected = True


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
    assert room.local_participant.data == [("voice", '{"type": "transcript", "text": "hi"}')]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert room.disconnected and detached == ["conversation"]
