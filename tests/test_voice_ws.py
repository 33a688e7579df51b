"""End to end through the voice engine's WebSocket: offline TTS speaks to pocketsphinx, a local SSE server answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import uvicorn
import websockets
from aiohttp import web
from fastapi import FastAPI
from livekit.api import AccessToken, VideoGrants

from shared.models import SessionDispatch
from shared.redis_server import free_port
from tests.fakes import serving_llm
from worker.voice.audio import FRAME_BYTES, rms
from worker.voice.engine import VoiceEngine
from worker.voice.pipeline import APOLOGY
from worker.voice.settings import VoiceSettings
from worker.voice.transport_ws import AudioAllowance, WebSocketTransport
from worker.voice.tts import EspeakTTS

QUESTION = "What is the weather like in Paris today?"
REPLY = "It is sunny in Paris today. Enjoy your walk by the river!"
LONG_REPLY = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 9))

_tts = EspeakTTS()


def speech(text: str) -> bytes:
    return _tts.synthesize_sync(text)


def token(room: str, identity: str = "caller") -> str:
    grants = VideoGrants(room_join=True, room=room)
    return AccessToken("devkey", "secret").with_identity(identity).with_grants(grants).to_jwt()


@dataclass
class FakeLLM:
    """A local OpenAI-compatible server streaming SSE chunks; ``mode`` picks the behaviour of the next request."""

    url: str = ""
    mode: str = "ok"
    reply: str = REPLY
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.mode == "fail":
            self.mode = "ok"  # fail once, then recover: the session must survive
            return web.Response(status=500, text="model exploded")
        if self.mode == "hang":
            self.mode = "ok"
            await asyncio.sleep(2)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = self.reply.split(" ")
        for i in range(0, len(words), 3):
            chunk = {"choices": [{"delta": {"content": " ".join(words[i : i + 3]) + " "}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    llm = FakeLLM()
    async with serving_llm(llm.handle) as url:
        llm.url = url
        yield llm


@dataclass
class Harness:
    engine: VoiceEngine
    base: str
    ended: list[tuple[str, str]]
    port: int = 0

    async def session(self, session_id: str = "s1", room: str = "room-1") -> SessionDispatch:
        spec = SessionDispatch(
            session_id=session_id, room=room, livekit_url="ws://127.0.0.1:1", token=token(room, "agent")
        )
        await self.engine.start_session(spec, lambda sid, reason: self.ended.append((sid, reason)))
        return spec

    def url(self, session_id: str = "s1", room: str = "room-1", tok: str | None = None) -> str:
        return f"{self.base}/sessions/{session_id}/audio?token={tok or token(room)}"


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness(fake_llm: FakeLLM) -> AsyncIterator[MakeHarness]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None], VoiceEngine]] = []

    async def make(sndbuf: int | None = None, **overrides: Any) -> Harness:
        """``sndbuf``: the server's socket send buffer, small to make a client that stops reading block it soon."""
        values: dict[str, Any] = {"llm_base_url": fake_llm.url, "llm_timeout_s": 5} | overrides
        settings = VoiceSettings(**values)
        engine = VoiceEngine(settings)
        await engine.start()
        app = FastAPI()
        router = engine.router()
        assert router is not None
        app.include_router(router)
        port = free_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # accepted connections inherit it
        sock.bind(("127.0.0.1", port))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        servers.append((server, task, engine))
        return Harness(engine, f"ws://127.0.0.1:{port}", [], port)

    yield make
    for server, task, engine in servers:
        await engine.aclose()
        server.should_exit = True
        await task


class Client:
    """Collects what the engine sends: JSON events and reply audio, with arrival times."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.audio: list[tuple[float, bytes]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if isinstance(msg, bytes):
                self.audio.append((time.monotonic(), msg))
            else:
                self.events.append(json.loads(msg) | {"_t": time.monotonic()})

    async def say(self, pcm: bytes, trailing_silence_s: float = 0.8) -> None:
        """Stream audio in real-time 20 ms frames, then silence, so the VAD sees the utterance end."""
        pcm += b"\0" * int(32000 * trailing_silence_s)
        start = time.monotonic()
        for n, i in enumerate(range(0, len(pcm), FRAME_BYTES)):
            await self.ws.send(pcm[i : i + FRAME_BYTES])
            delay = start + (n + 1) * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e["type"] == kind]
            if len(found) >= count:
                return found[count - 1]
            if self._reader.done():
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {kind} #{count}; events: {[e['type'] for e in self.events]}")

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


async def test_end_to_end_reply_audio_and_latencies(make_harness: MakeHarness, fake_llm: FakeLLM) -> None:
    """A spoken question is transcribed, answered by the LLM and spoken back, with every stage timed."""
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.wait_for("ready")
        await client.say(speech(QUESTION))
        transcript = await client.wait_for("transcript")
        for word in ("weather", "paris", "today"):
            assert word in transcript["text"]
        end = await client.wait_for("reply_end")
        await asyncio.sleep(0.3)
    timings = end["timings"]
    print(f"\nvoice turn timings (ms): {timings}")
    for stage in ("vad_ms", "stt_ms", "llm_first_token_ms", "llm_first_sentence_ms", "tts_first_ms", "e2e_ms"):
        assert timings[stage] >= 0, stage
    assert 0 < timings["e2e_ms"] < 3000
    audio = b"".join(chunk for _, chunk in client.audio)
    assert len(audio) > 32000  # over a second of reply
    assert rms(audio) > 500
    sentences = [e["text"] for e in client.of("reply_text")]
    assert sentences == ["It is sunny in Paris today.", "Enjoy your walk by the river!"]
    messages = fake_llm.requests[0]["messages"]
    assert messages[0]["role"] == "system" and messages[1] == {"role": "user", "content": transcript["text"]}
    stats = h.engine.stats()
    assert stats.latency_ms == timings["e2e_ms"] and stats.active_sessions == 1 and stats.error_rate == 0
    assert set(h.engine.stage_latency_ms) >= {"stt_ms", "e2e_ms", "tts_first_ms"}


async def test_barge_in_stops_reply_and_history_carries(make_harness: MakeHarness, fake_llm: FakeLLM) -> None:
    """User speech during a reply stops its audio at once; the next turn is heard and the history kept."""
    fake_llm.reply = LONG_REPLY
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.say(speech(QUESTION), trailing_silence_s=0.5)
        await client.wait_for("first_audio")
        await asyncio.sleep(0.5)
        fake_llm.reply = "Goodbye."
        await client.say(speech("Tell me a joke"), trailing_silence_s=0.8)
        barge = await client.wait_for("barge_in")
        second = await client.wait_for("transcript", 2)
        assert "joke" in second["text"]
        await client.wait_for("reply_end")
    reply_audio_s = sum(len(c) for t, c in client.audio if t < barge["_t"]) / 32000
    assert reply_audio_s < 3  # the long reply is ~12 s of speech
    assert not any(e["type"] == "reply_end" and e["_t"] < barge["_t"] for e in client.events)
    history = fake_llm.requests[1]["messages"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]


async def test_llm_failure_apologises_and_session_survives(make_harness: MakeHarness, fake_llm: FakeLLM,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    fake_llm.mode = "fail"
    h = await make_harness()
    await h.session()
    pcm = speech(QUESTION)
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.say(pcm)
        error = await client.wait_for("error")
        assert error["stage"] == "llm" and "500" in caplog.text
        assert "500" not in error["message"] and "127.0.0.1" not in error["message"], "backend detail stays in the log"
        await client.wait_for("first_audio")
        assert rms(b"".join(c for _, c in client.audio)) > 500  # the apology is spoken
        end = await client.wait_for("reply_end")
        assert end["error"] == "llm" and h.engine.metrics.errors == 1
        await client.say(pcm)
        second = await client.wait_for("reply_end", 2)
        assert second["error"] is None
    assert h.engine.stats().error_rate == 0.5
    assert APOLOGY


async def test_llm_timeout_is_an_evented_error(make_harness: MakeHarness, fake_llm: FakeLLM,
                                               caplog: pytest.LogCaptureFixture) -> None:
    fake_llm.mode = "hang"
    h = await make_harness(llm_timeout_s=0.5)
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.say(speech(QUESTION))
        error = await client.wait_for("error")
        assert error["stage"] == "llm" and "0.5" in caplog.text


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00" * 641, 1007),
        ("not json", 1003),
        (b"\x00" * 64_000, 1009),
        ("[" * 3000, 1003),  # nested too deep for the JSON parser: a RecursionError, not a ValueError
        (json.dumps({"type": "end", "pad": "x" * 5000}), 1009),  # a control message is small; this one is not
    ],
    ids=["odd-bytes", "not-json", "audio-over-1s", "deeply-nested-json", "text-over-4kb"],
)
async def test_malformed_input_closes_with_clear_code(make_harness: MakeHarness, frame: Any, code: int) -> None:
    """Malformed input closes the connection, not the session: the client is not told ``session_end`` (it used to
    be, while the session went on holding its slot), and a new connection finds the session running."""
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        await ws.send(frame)
        received: list[str | bytes] = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                received.append(await ws.recv())
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    events = [json.loads(m)["type"] for m in received if isinstance(m, str)]
    assert "session_end" not in events, events
    assert "s1" in h.engine.sessions and not h.ended  # the session survives a bad connection
    async with websockets.connect(h.url()) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "ready"


async def test_auth_and_unknown_session(make_harness: MakeHarness) -> None:
    h = await make_harness()
    await h.session()
    grants = VideoGrants(room_join=True, room="room-1")
    bad = AccessToken("devkey", "wrong-secret").with_identity("x").with_grants(grants).to_jwt()
    # closing before accept is answered as HTTP 403 by the ASGI server, whatever the close code
    anonymous = f"{h.base}/sessions/s1/audio"
    for url in [h.url(tok=bad), h.url(tok=token("other-room")), anonymous, h.url(session_id="nope")]:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url) as ws:
                await ws.recv()
        assert refused.value.response.status_code == 403, url


async def test_session_time_limit_ends_cleanly(make_harness: MakeHarness) -> None:
    h = await make_harness(session_max_s=0.6)
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        end = await client.wait_for("session_end", timeout=5)
        assert end["reason"] == "time_limit"
        await asyncio.wait_for(client._reader, 5)
    assert h.ended == [("s1", "time_limit")]
    assert h.engine.stats().active_sessions == 0


def test_reply_audio_is_not_silence() -> None:
    assert float(np.abs(np.frombuffer(speech("hello"), dtype=np.int16)).max()) > 1000


async def test_worker_metrics_export_the_voice_stages() -> None:
    """The worker's /metrics carries each stage's latency of an engine that reports stages."""
    import httpx

    from worker.app import create_worker_app
    from worker.sessions import SessionManager

    class Staged:
        name, profile = "staged", None
        stage_latency_ms = {"stt_ms": 70.0, "e2e_ms": 415.0}

        def stats(self):  # type: ignore[no-untyped-def]
            from worker.engine import EngineStats

            return EngineStats(latency_ms=415.0)

        def router(self) -> None:
            return None

    app = create_worker_app(SessionManager(Staged(), 1), "token")  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
        text = (await client.get("/metrics")).text
    assert 'worker_engine_stage_latency_ms{stage="stt_ms"} 70.0' in text
    assert 'worker_engine_stage_latency_ms{stage="e2e_ms"} 415.0' in text


async def wait_until(check: Callable[[], object], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_a_client_that_stops_reading_cannot_wedge_the_session_end(make_harness: MakeHarness) -> None:
    """The client keeps its TCP connection open but reads nothing, so sends to it block: stopping the session
    still returns within ``close_timeout_s`` and the connection is cut off."""
    h = await make_harness(sndbuf=4096, close_timeout_s=0.3)
    await h.session()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", h.port))
    ws = await websockets.connect(h.url(), sock=raw, max_queue=1)  # max_queue=1: it stops reading at once
    session = h.engine.sessions["s1"]
    await wait_until(lambda: session.conversations)
    transport = next(iter(session.conversations)).transport
    sent = 0

    async def reply_audio() -> None:  # what a reply sends, and this client no longer takes
        nonlocal sent
        while True:
            await transport.send_audio(b"\0" * 32000)
            sent += 1

    sending = asyncio.create_task(reply_audio())
    last = -1
    while sent != last:  # until the sends block
        last = sent
        await asyncio.sleep(0.2)
    started = time.monotonic()
    await asyncio.wait_for(h.engine.stop_session("s1"), 5)
    assert time.monotonic() - started < 2
    await asyncio.wait_for(asyncio.gather(sending, return_exceptions=True), 2)  # cut off: the blocked send fails
    assert "s1" not in h.engine.sessions
    ws.transport.abort()


async def test_a_session_nobody_connects_to_ends_unattended(make_harness: MakeHarness) -> None:
    h = await make_harness(unattended_s=0.3)
    await h.session()
    await wait_until(lambda: h.ended, 3)
    assert h.ended == [("s1", "unattended")]
    assert "s1" not in h.engine.sessions and h.engine.stats().active_sessions == 0


async def test_a_client_that_went_away_frees_the_slot(make_harness: MakeHarness) -> None:
    """While connected the session stays, however long; after the client leaves, the grace runs out."""
    h = await make_harness(unattended_s=0.3)
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.wait_for("ready")
        await asyncio.sleep(0.6)
        assert not h.ended
    await wait_until(lambda: h.ended, 3)
    assert h.ended == [("s1", "unattended")]


async def test_the_client_end_message_ends_the_session(make_harness: MakeHarness) -> None:
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.wait_for("ready")
        await ws.send(json.dumps({"type": "end"}))
        end = await client.wait_for("session_end")
        await asyncio.wait_for(client._reader, 5)
    assert end["reason"] == "client_ended"
    assert ws.close_code == 1000
    assert h.ended == [("s1", "client_ended")] and "s1" not in h.engine.sessions


async def closed_with(ws: websockets.ClientConnection) -> websockets.ConnectionClosed:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    return closed.value


@pytest.fixture
def audio_fed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of client audio that reached a conversation, in total (one number, kept in a list)."""
    from worker.voice import pipeline

    feed = pipeline.Conversation.feed
    fed = [0]

    async def counted(self: pipeline.Conversation, pcm: bytes) -> None:
        fed[0] += len(pcm)
        await feed(self, pcm)

    monkeypatch.setattr(pipeline.Conversation, "feed", counted)
    return fed


async def flood(h: Harness, seconds: int = 20) -> websockets.ConnectionClosed:
    """Send ``seconds`` of audio in 1 s frames as fast as the socket takes them; how the worker closed."""
    async with websockets.connect(h.url()) as ws:
        await ws.recv()  # ready
        with contextlib.suppress(websockets.ConnectionClosed):
            for _ in range(seconds):
                await ws.send(b"\0" * 32_000)
        return await closed_with(ws)


async def test_audio_sent_faster_than_real_time_is_cut_off(make_harness: MakeHarness, audio_fed: list[int]) -> None:
    """A client that floods its session with audio would take the worker's event loop from every other session
    (each second of audio is 50 VAD+STT steps): past a short burst, audio faster than real time closes with 1008."""
    h = await make_harness()
    await h.session()
    started = time.monotonic()
    closed = await flood(h)
    assert closed.rcvd is not None and closed.rcvd.code == 1008, closed
    assert "faster than real time" in closed.rcvd.reason, closed.rcvd.reason
    allowed_s = 3.0 + 1.2 * (time.monotonic() - started)  # the burst, then 1.2x real time
    assert audio_fed[0] / 32_000 <= allowed_s, f"{audio_fed[0] / 32_000} s of audio reached the pipeline"
    assert "s1" in h.engine.sessions  # the session survives the bad connection, like any malformed input


async def test_a_reconnect_does_not_refill_the_audio_allowance(make_harness: MakeHarness,
                                                               audio_fed: list[int]) -> None:
    h = await make_harness()
    await h.session()
    first = await flood(h)
    after_first = audio_fed[0]
    second = await flood(h)
    assert first.rcvd is not None and second.rcvd is not None and (first.rcvd.code, second.rcvd.code) == (1008, 1008)
    assert (audio_fed[0] - after_first) / 32_000 < 1.0  # only what 1.2x real time refilled in between


async def test_a_client_sending_at_real_time_is_not_cut_off(make_harness: MakeHarness) -> None:
    """Half-second frames, each sent when its time has come, with a one-off backlog of 2 s (a network stall)."""
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        client = Client(ws)
        await client.wait_for("ready")
        start = time.monotonic()
        for n in range(8):
            if 1 <= n <= 4:
                continue  # held back by the stall: frames 1 to 4 go out with frame 5
            await asyncio.sleep(max(0.0, start + n * 0.5 - time.monotonic()))
            for _ in range(5 if n == 5 else 1):
                await ws.send(b"\0" * 16_000)
        await asyncio.sleep(0.2)
        assert not client._reader.done(), ws.close_code


async def test_a_long_frame_does_not_hold_the_event_loop(make_harness: MakeHarness,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 s frame is 50 steps of VAD+STT; between them the other sessions on the worker's loop get their turn."""
    from worker.voice import pipeline

    frame = pipeline.Conversation._frame
    steps = 0

    async def costly_frame(self: pipeline.Conversation, pcm: bytes) -> None:
        nonlocal steps
        time.sleep(0.004)  # what VAD+STT of one 20 ms frame may cost on a loaded host
        steps += 1
        await frame(self, pcm)

    monkeypatch.setattr(pipeline.Conversation, "_frame", costly_frame)
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as ws:
        await ws.recv()
        gaps: list[float] = []
        last = time.perf_counter()
        await ws.send(b"\0" * 32_000)
        async with asyncio.timeout(5):
            while steps < 50:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
    assert max(gaps) < 0.1, f"the loop was held for {max(gaps) * 1000:.0f} ms (50 steps take ~200 ms)"


def test_a_client_that_was_quiet_for_long_still_gets_only_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time the client sent nothing does not bank allowance beyond ``AUDIO_BURST_S``: after ten idle minutes it may
    send 3 s of audio at once, not ten minutes' worth."""
    from worker.voice import transport_ws

    now = [1000.0]
    monkeypatch.setattr(transport_ws.time, "monotonic", lambda: now[0])
    allowance = AudioAllowance(rate=1.2, burst_s=3.0)
    now[0] += 600
    assert allowance.take(3.0)
    assert not allowance.take(1.0)
    now[0] += 600
    assert not allowance.take(60.0)


async def test_a_token_in_the_authorization_header_is_accepted(make_harness: MakeHarness) -> None:
    """Clients that keep the token out of the URL (and so out of proxy logs) send it as ``Authorization: Bearer``."""
    h = await make_harness()
    await h.session()
    headers = {"Authorization": f"Bearer {token('room-1')}"}
    async with websockets.connect(f"{h.base}/sessions/s1/audio", additional_headers=headers) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "ready"


def test_a_token_that_does_not_grant_joining_the_room_is_refused() -> None:
    from worker.voice.transport_ws import verify_token

    def signed(grants: VideoGrants) -> str:
        return AccessToken("devkey", "secret").with_identity("caller").with_grants(grants).to_jwt()

    assert verify_token(signed(VideoGrants(room_join=True, room="room-1")), "room-1", "devkey", "secret") == "caller"
    assert verify_token(signed(VideoGrants(room_join=False, room="room-1")), "room-1", "devkey", "secret") is None
    assert verify_token(signed(VideoGrants(room_admin=True, room="room-1")), "room-1", "devkey", "secret") is None


async def test_a_second_audio_connection_to_a_session_is_refused(make_harness: MakeHarness) -> None:
    """One client speaks in a session: a second connection (another device, a retry while the first is still open)
    is refused rather than mixed into the first one's audio; once the first is gone, it may connect."""
    h = await make_harness()
    await h.session()
    async with websockets.connect(h.url()) as first:
        assert json.loads(await asyncio.wait_for(first.recv(), 5))["type"] == "ready"
        with pytest.raises(websockets.InvalidStatus) as refused:  # closed before accept: HTTP 403
            async with websockets.connect(h.url()) as second:
                await second.recv()
        assert refused.value.response.status_code == 403
    session = h.engine.sessions["s1"]
    await wait_until(lambda: not session.ws_attached)
    async with websockets.connect(h.url()) as again:
        assert json.loads(await asyncio.wait_for(again.recv(), 5))["type"] == "ready"


async def test_a_close_frame_the_client_never_takes_cuts_it_off_within_the_bound() -> None:
    """Closing a session's socket must not hang on a client that stopped reading: after ``close_timeout_s`` the
    connection is cut off. A socket already gone closes quietly."""
    class Stuck:
        async def close(self, code: int, reason: str) -> None:
            await asyncio.Event().wait()

    class Gone:
        async def close(self, code: int, reason: str) -> None:
            raise RuntimeError("Cannot call 'send' once a close message has been sent.")

    cut: list[str] = []
    for ws in (Stuck(), Gone()):
        transport = WebSocketTransport(ws, close_timeout_s=0.1)  # type: ignore[arg-type]
        transport.abort = lambda ws=ws: cut.append(type(ws).__name__)  # type: ignore[method-assign]
        await asyncio.wait_for(transport.close("session ended"), 5)
    assert cut == ["Stuck"]
