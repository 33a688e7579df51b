"""A caller asks the hub for a voice session and talks to the worker it was placed on, over real HTTP/WebSocket.

Real hub (in-process, real Redis), real worker API (``create_worker_app``, uvicorn on loopback) running the voice
engine (pocketsphinx, espeak-ng) answered by the local OpenAI-compatible test server.

The worker announces its audio WebSocket at registration (as ``fleet worker`` does from the engine's path); the
session config a client gets from ``POST /api/v1/sessions`` carries it for that session, with the LiveKit
participant token the worker checks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
import websockets

from shared.redis_server import free_port
from tests.conftest import WORKER_AUTH, WORKER_TOKEN, HubClientFactory, heartbeat, refresh, registration
from tests.test_voice_ws import QUESTION, Client, FakeLLM, fake_llm, speech  # noqa: F401 - fake_llm is a fixture
from worker.agent import client_audio_url
from worker.app import create_worker_app
from worker.sessions import SessionManager
from worker.voice.audio import rms
from worker.voice.engine import VoiceEngine
from worker.voice.settings import VoiceSettings


@dataclass
class VoiceWorker:
    engine: VoiceEngine
    manager: SessionManager
    url: str


@pytest.fixture
async def voice_worker(fake_llm: FakeLLM) -> AsyncIterator[VoiceWorker]:  # noqa: F811 - the imported fixture
    engine = VoiceEngine(VoiceSettings(llm_base_url=fake_llm.url, llm_timeout_s=5))
    await engine.start()
    manager = SessionManager(engine, max_streams=2)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_worker_app(manager, WORKER_TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield VoiceWorker(engine, manager, f"http://127.0.0.1:{port}")
    finally:
        await manager.stop_all()
        await engine.aclose()
        server.should_exit = True
        await task


async def keep_beating(hub: httpx.AsyncClient, worker_id: str, secret: str, manager: SessionManager) -> None:
    """What the worker agent's heartbeat loop does: report the sessions running, so the hub keeps their leases."""
    while True:
        await heartbeat(hub, worker_id, secret, manager.ids(), latency_ms=manager.engine.stats().latency_ms)
        await asyncio.sleep(0.3)


async def test_a_session_from_the_hub_talks_to_the_voice_worker(make_hub: HubClientFactory, voice_worker: VoiceWorker,
                                                                fake_llm: FakeLLM) -> None:  # noqa: F811
    hub = await make_hub()
    audio_url = client_audio_url(voice_worker.url, voice_worker.engine.client_audio_path)
    resp = await hub.post("/api/v1/workers", json=registration("w-voice", voice_worker.url, max_streams=2,
                                                               engine="voice", audio_url=audio_url),
                          headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    beats = asyncio.create_task(keep_beating(hub, "w-voice", resp.json()["worker_secret"], voice_worker.manager))
    try:
        await asyncio.sleep(0.05)
        await refresh(hub)
        placed = await hub.post("/api/v1/sessions", json={"identity": "caller"})
        assert placed.status_code == 201, placed.text
        config = placed.json()
        assert config["worker"]["id"] == "w-voice" and config["session_id"] in voice_worker.engine.sessions

        assert config["worker"]["audio_url"] == voice_worker.url.replace("http", "ws", 1) + (
            f"/sessions/{config['session_id']}/audio")
        url = f"{config['worker']['audio_url']}?token={config['livekit']['token']}"
        async with websockets.connect(url) as ws:
            client = Client(ws)
            ready = await client.wait_for("ready")
            assert ready["session_id"] == config["session_id"]
            await client.say(speech(QUESTION))
            transcript = await client.wait_for("transcript")
            end = await client.wait_for("reply_end")
        for word in ("weather", "paris", "today"):
            assert word in transcript["text"]
        timings = end["timings"]
        print(f"\nvoice turn via the hub (ms): {timings}")
        assert end["error"] is None
        for stage in ("vad_ms", "stt_ms", "llm_first_token_ms", "llm_first_sentence_ms", "tts_first_ms"):
            assert 0 <= timings[stage] < 2000, stage
        assert 0 < timings["e2e_ms"] < 3000
        audio = b"".join(chunk for _, chunk in client.audio)
        assert len(audio) > 32000 and rms(audio) > 500
        assert fake_llm.requests[0]["messages"][-1] == {"role": "user", "content": transcript["text"]}

        assert (await hub.delete(f"/api/v1/sessions/{config['session_id']}")).status_code == 204
        async with asyncio.timeout(5):
            while config["session_id"] in voice_worker.engine.sessions:
                await asyncio.sleep(0.05)
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats
