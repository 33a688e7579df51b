"""The worker's heartbeat channel against hubs that fail in its way: a hub that freezes holding it, a resume that is
news only when asked for, a late close on a channel of the previous registration, an answer the worker cannot read.

The frozen hub and the unreadable answer are small aiohttp fakes (a real hub cannot be frozen inside the test's own
event loop); the rest run against a real hub and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shared.backoff import backoff_delays
from shared.models import MAX_STREAMS_PER_WORKER, Heartbeat, SessionDispatch, WorkerRegistration, WorkerState
from shared.redis_server import free_port
from tests.conftest import ADMIN_AUTH, WORKER_TOKEN
from tests.test_worker_drain import running
from tests.test_worker_hub import wait_for, worker_settings
from worker import heartbeat_channel, hub_client
from worker.agent import WorkerAgent
from worker.engines.synthetic import SyntheticEngine
from worker.heartbeat_channel import Delivery, HeartbeatChannel
from worker.hub_client import HubClient
from worker.hub_errors import HubUnavailable, WorkerForgotten
from worker.sessions import SessionManager

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def registration() -> WorkerRegistration:
    return WorkerRegistration(worker_id="w1", url="http://127.0.0.1:1", region="us-east-1", max_streams=2)


@pytest.fixture
async def fake_hub() -> AsyncIterator[Callable[[Handler, Handler], Awaitable[str]]]:
    """Serves a registration handler and a heartbeat handler (POST and WebSocket) for worker w1; returns the URL."""
    runners: list[web.AppRunner] = []

    async def serve(register: Handler, beat: Handler) -> str:
        app = web.Application()
        app.router.add_post("/api/v1/workers", register)
        app.router.add_route("*", "/api/v1/workers/w1/heartbeat", beat)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def heartbeating(client: HubClient) -> AsyncIterator[HubClient]:
    """``client`` registered and running its heartbeat loop; afterwards the loop is cancelled and the client closed."""
    await client.register()
    loop = asyncio.create_task(client.heartbeat_loop())
    try:
        yield client
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await client.aclose()


async def test_a_hub_that_freezes_holding_the_channel_loses_no_heartbeat_beyond_its_ttl(fake_hub: Any) -> None:
    """The hub's process stops (SIGSTOP, a paused VM) with the channel's TCP connection still open, at the worst
    moment: just after answering a heartbeat. The worker must notice and POST (behind the deployment's one URL a
    healthy hub takes it) before the hub's TTL of three intervals lapses: it asks for an answer at least every
    second heartbeat, and does not wait for a closing handshake the frozen hub will never send. Guards against
    acks every fifth heartbeat, which left ~6 intervals without a heartbeat and the live worker out of routing."""
    # The worker's worst gap here is about 2.5 intervals (the next heartbeat, then the wait for its answer) against
    # a TTL of 3: an interval of a second leaves half a second for a loaded machine's delays, not a quarter.
    interval = 1.0
    received: list[tuple[float, str]] = []
    frozen = asyncio.Event()

    def reply() -> dict[str, Any]:
        return {"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 2,
                "heartbeat_interval_s": interval, "stop_sessions": []}

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": interval, "ttl_s": 3 * interval,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            received.append((time.monotonic(), "post"))  # a fresh request reaches a healthy hub
            return web.json_response(reply())
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if frozen.is_set():
                await asyncio.sleep(3600)  # frozen: reads nothing, answers nothing, closes nothing
            received.append((time.monotonic(), "channel"))
            if Heartbeat.model_validate_json(message.data).ack:
                await ws.send_json(reply())
                if len(received) >= 4:
                    frozen.set()
        return ws

    url = await fake_hub(register, beat)
    manager = SessionManager(SyntheticEngine(), 2)
    # The hub timeout equal to the interval, as in the defaults (3 s and 3 s, TTL 9 s).
    async with heartbeating(HubClient([url], WORKER_TOKEN, registration(), manager, timeout_s=interval)):
        await wait_for(frozen.is_set, 10, "the hub to freeze")
        await wait_for(lambda: sum(how == "post" for _, how in received) >= 3, 30, "POSTs past the frozen hub")
    times = [t for t, _ in received]
    worst = max(later - earlier for earlier, later in itertools.pairwise(times))
    assert any(how == "post" for _, how in received), received
    assert worst < 3 * interval, f"{worst / interval:.1f} intervals without a heartbeat; the TTL is 3"


async def test_a_resume_reaches_a_worker_drained_by_the_hub_at_its_next_heartbeat(
        make_running_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an SRE keeps it drained, the worker reports `ready` (the drain is the hub's), so the hub has no news to
    send when it is resumed: each heartbeat must ask for an answer, or the worker refuses sessions the hub already
    routes to it until its next answered heartbeat. Guards against a worker that learnt of a resume up to four
    intervals late."""
    interval = 0.5
    hub = await make_running_hub(heartbeat_interval_s=interval)
    agent = WorkerAgent(worker_settings(hub), install_signals=False)
    sent: list[tuple[bool, bool]] = []  # (refusing sessions when sent, asked for an answer)
    send_str = aiohttp.ClientWebSocketResponse.send_str

    async def recording(self: aiohttp.ClientWebSocketResponse, data: str, *args: Any, **kwargs: Any) -> None:
        sent.append((agent.manager is not None and agent.manager.draining, json.loads(data).get("ack", True)))
        await send_str(self, data, *args, **kwargs)

    monkeypatch.setattr(aiohttp.ClientWebSocketResponse, "send_str", recording)
    lags = []
    late = []  # per resume: the heartbeats sent after it by a worker still refusing sessions
    async with running(agent), hub.client() as client:
        for attempt in range(3):
            assert (await client.post("/api/v1/workers/w-agent/drain", headers=ADMIN_AUTH)).status_code == 200
            await wait_for(lambda: agent.manager.draining, 5, "the drain")
            await asyncio.sleep(0.3 + 0.37 * attempt)  # a resume at different moments between heartbeats
            resumed = await client.post("/api/v1/workers/w-agent/resume", headers=ADMIN_AUTH)
            assert resumed.json()["state"] == "ready"
            at, mark = time.monotonic(), len(sent)
            await wait_for(lambda: not agent.manager.draining, 10, "the resume")
            lags.append(time.monotonic() - at)
            late.append(sum(drained for drained, _ in sent[mark:]))
        assert agent.hub.transport == "channel"
        assert all(ack for drained, ack in sent if drained) and (True, True) in sent, sent
    # Counted in heartbeats, not seconds: the answer to the first heartbeat after the resume brings it (a heartbeat
    # already on its way may bring it sooner); learning it later means a heartbeat went unanswered.
    assert max(late) <= 1, (late, lags)


async def test_a_late_refusal_on_the_channel_of_the_old_secret_spares_the_new_one(make_running_hub: Any) -> None:
    """A heartbeat sent on the channel before a re-registration but handled by the hub after it is refused with
    4403 (the secret changed). Guards against that close wiping the new secret: the worker then registered without
    one and was refused (409) until its own registration's TTL lapsed."""
    running = await make_running_hub()
    manager = SessionManager(SyntheticEngine(), max_streams=2)
    client = HubClient([running.url], WORKER_TOKEN, registration(), manager, timeout_s=1.0)
    try:
        await client.register_once()
        await client.heartbeat_once()
        assert client.transport == "channel"
        old_channel = client._channel._ws
        assert old_channel is not None
        late = (await client.build_heartbeat()).model_copy(update={"ack": False}).model_dump_json()
        await client.register_once()  # e.g. after a heartbeat failed: a new secret
        new_secret = client.secret
        if not old_channel.closed:  # the heartbeat that was on its way arrives now
            await old_channel.send_str(late)
            await asyncio.sleep(0.5)
        assert client.secret == new_secret and new_secret is not None
        await client.heartbeat_once()
        assert client.transport == "channel" and old_channel.closed
    finally:
        await client.aclose()


async def test_an_unreadable_registration_answer_never_puts_the_worker_secret_in_the_logs(
        fake_hub: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A hub of another version (a rolling deploy) answers the registration with a field missing. Guards against
    the validation error's text, which quotes the answer, part of the worker secret included, reaching the log."""
    secret = "wsec-7f3a9c1e2b4d6f8091a2b3c4d5e6f708"

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 3.0, "ttl_s": 9.0,
                                  "worker_secret": secret})  # no `state`

    async def beat(_: web.Request) -> web.Response:
        return web.Response(status=404)

    url = await fake_hub(register, beat)
    caplog.set_level("DEBUG")
    client = HubClient([url], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0)
    try:
        with pytest.raises(HubUnavailable) as refused:
            await client.register_once()
        task = asyncio.create_task(client.register())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await client.aclose()
    assert "registration failed" in caplog.text
    pieces = {secret[i:i + 10] for i in range(len(secret) - 9)}  # pydantic shortens a long input in the middle
    assert not any(piece in caplog.text or piece in str(refused.value) for piece in pieces), caplog.text
    assert "state: Field required" in str(refused.value), "where the answer was wrong is still said"


async def test_a_refusal_of_another_secret_leaves_the_current_one(make_running_hub: Any) -> None:
    """The channel's reader clears the secret on 4403 only when it is still the one the channel was opened with."""
    running = await make_running_hub()
    client = HubClient([running.url], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2))
    try:
        await client.register_once()
        await client.heartbeat_once()
        assert client._channel._ws is not None and client.secret is not None
        closed = aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, 4403, "the X-Worker-Secret does not match this worker")
        with pytest.raises(WorkerForgotten):
            client._channel._read_answer(closed, client._channel._ws, "an-older-secret")
        assert client.secret is not None
        with pytest.raises(WorkerForgotten):
            client._channel._read_answer(closed, client._channel._ws, client.secret)
        assert client.secret is None
    finally:
        await client.aclose()


async def test_a_registration_whose_answer_was_lost_is_sent_again_not_locked_out(
    make_running_hub: Any, fake_hub: Any
) -> None:
    """A re-registration ran on the hub, but its answer never reached the worker (here a proxy in front of the hub
    drops it). The worker sends the same registration again and is accepted; before, the hub had rotated the
    secret to one the worker never learned, and the retry was refused (409) until the TTL lapsed."""
    running = await make_running_hub(worker_ttl_s=30)
    drop_next, dropped = False, 0

    async def forward(request: web.Request) -> web.StreamResponse:
        nonlocal drop_next, dropped
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith(("authorization", "x-worker"))}
        async with aiohttp.ClientSession() as http, http.post(
                f"{running.url}/api/v1/workers", data=await request.read(),
                headers={**headers, "Content-Type": "application/json"}) as answer:
            body = await answer.read()
        if drop_next:
            drop_next, dropped = False, dropped + 1
            return web.json_response({"error": "upstream_timeout", "message": "lost"}, status=504)
        return web.Response(body=body, status=answer.status, content_type="application/json")

    async def no_heartbeats(_: web.Request) -> web.Response:
        return web.Response(status=404)

    proxy = await fake_hub(forward, no_heartbeats)
    client = HubClient([proxy], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0)
    try:
        await client.register_once()
        drop_next = True
        with pytest.raises(HubUnavailable):
            await client.register_once()  # ran on the hub; the answer is lost
        assert dropped == 1
        accepted = await client.register_once()  # the same registration, sent again
        assert client.secret == accepted.worker_secret
        client.hub_url, client.hub_urls = running.url, [running.url]
        await client.heartbeat_once()  # the hub knows this secret
    finally:
        await client.aclose()


class SlowToStopEngine(SyntheticEngine):
    """Stops like the voice engine: forgets the session, says goodbye to a client slow to take it (the voice engine
    waits up to twice its 2 s close timeout), then cancels the session's work."""

    def __init__(self, goodbye_s: float) -> None:
        super().__init__()
        self.goodbye_s = goodbye_s
        self.stops_finished: list[str] = []

    async def stop_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        await asyncio.sleep(self.goodbye_s)
        session.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await session.task
        self.stops_finished.append(session_id)


async def test_a_stop_the_hub_asks_for_runs_to_its_end_whatever_happens_to_the_channel(
        make_running_hub: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The hub's answer on the channel lists a session it does not hold; the engine takes longer to stop it than
    the heartbeat waits for an answer, and the worker shuts down before the stop is done. Guards against stops run
    inside the channel's reader: the answer counted as lost (the channel dropped), closing the channel cancelled
    the engine's stop half-way, and the session kept running in the engine while the worker counted its slot
    free."""
    caplog.set_level("INFO", logger="worker.heartbeat_channel")
    interval = 1.0
    hub = await make_running_hub(heartbeat_interval_s=interval, worker_ttl_s=3 * interval)
    engine = SlowToStopEngine(goodbye_s=4 * interval)
    manager = SessionManager(engine, 2)
    client = HubClient([hub.url], WORKER_TOKEN, registration(), manager, timeout_s=interval)
    await client.register()
    orphan = "w1~orphan0000000001"  # one the hub does not hold (it lost it): its answer says stop
    await manager.start(SessionDispatch(session_id=orphan, room="r", livekit_url="ws://x", token="t"))
    work = engine._sessions[orphan].task
    loop = asyncio.create_task(client.heartbeat_loop())
    try:
        await wait_for(lambda: orphan not in manager.ids(), 5, "the hub's stop")
        await asyncio.sleep(2 * interval)  # past the answer's wait and the next heartbeat
        assert client.transport == "channel" and "channel lost" not in caplog.text, caplog.text
        assert not work.done()  # the goodbye still runs
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await client.aclose()  # closes the channel while the engine still stops the session
    await manager.stop_all()  # what the drain does before the engine closes
    assert engine.stops_finished == [orphan], "the engine's stop was cut short"
    assert work.done()


async def test_a_refused_channel_is_tried_again_after_a_jittered_delay_that_grows(
        fake_hub: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that refuses the upgrade (an old hub, a proxy without upgrades) gets heartbeats by POST, and the
    channel is tried again after a random delay that grows, up to five minutes, while the refusals go on. Guards
    against a fixed minute: workers refused together (a hub restarting) all came back together a minute later."""
    upgrades = 0

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(request: web.Request) -> web.Response:
        nonlocal upgrades
        if request.headers.get("Upgrade", "").lower() == "websocket":
            upgrades += 1
            return web.Response(status=405)
        return web.json_response({"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 2,
                                  "heartbeat_interval_s": 1.0, "stop_sessions": []})

    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(heartbeat_channel, "time", clock)
    caplog.set_level("INFO", logger="worker.heartbeat_channel")
    client = HubClient([await fake_hub(register, beat)], WORKER_TOKEN, registration(),
                       SessionManager(SyntheticEngine(), 2), timeout_s=1.0)
    waits: list[float] = []
    try:
        await client.register_once()
        for _ in range(12):
            before = upgrades
            await client.heartbeat_once()
            assert upgrades == before + 1 and client.transport == "post"
            refusal = [r for r in caplog.records if r.getMessage().startswith("heartbeat channel unavailable")][-1]
            assert isinstance(refusal.args, tuple)
            delay = refusal.args[-1]
            assert isinstance(delay, float)
            waits.append(delay)
            clock.now += waits[-1] - 0.5
            await client.heartbeat_once()
            assert upgrades == before + 1, "the channel was tried again before its delay was over"
            clock.now += 1.0
    finally:
        await client.aclose()
    assert len({round(wait, 3) for wait in waits}) > len(waits) // 2, f"no jitter: {waits}"
    assert waits[0] <= 60 and max(waits[4:]) > 60, f"no backoff: {waits}"
    assert max(waits) <= 300, f"no cap: {waits}"


async def test_the_answer_to_a_full_worker_fits_the_channel(fake_hub: Any) -> None:
    """Regression: the worker read at most 64 KiB from the channel, while a hub's answer to a full worker (1,024 of
    the longest session ids to stop, after a Redis that forgot them) is twice that: the channel broke on every such
    answer and the heartbeat went by POST."""
    posts: list[str] = []
    to_stop = [f"{'w' * 64}~{n:064d}" for n in range(MAX_STREAMS_PER_WORKER)]
    reply = {"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 2, "heartbeat_interval_s": 1.0,
             "stop_sessions": to_stop}

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            posts.append("post")
            return web.json_response(reply)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if Heartbeat.model_validate_json(message.data).ack:
                await ws.send_json(reply)
        return ws

    assert len(json.dumps(reply)) > 128 * 1024
    client = HubClient([await fake_hub(register, beat)], WORKER_TOKEN, registration(),
                       SessionManager(SyntheticEngine(), 2), timeout_s=2.0)
    try:
        await client.register()
        for _ in range(3):
            await client.heartbeat_once()
        assert posts == [] and client.transport == "channel"
        assert client.last_reply is not None and client.last_reply.stop_sessions == to_stop
    finally:
        await client.aclose()


async def test_closing_the_channel_passes_on_a_cancellation_of_its_caller(make_running_hub: Any) -> None:
    """The heartbeat loop is cancelled (the drain stops it) while a heartbeat closes the channel and waits for its
    reader to end. Guards against waiting under ``suppress(CancelledError)``: it ate the loop's own cancellation
    too, and the loop went on heartbeating while the drain waited for it to end."""
    running = await make_running_hub()
    client = HubClient([running.url], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2))
    try:
        await client.register_once()
        await client.heartbeat_once()
        assert client.transport == "channel"
        closing = asyncio.create_task(client._channel.close())
        await asyncio.sleep(0)  # it has cancelled the reader and waits for it to end
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    finally:
        await client.aclose()


async def test_a_cancel_that_comes_with_the_hubs_answer_is_not_lost() -> None:
    """The heartbeat loop is cancelled (a drain) in the same loop step as the hub's answer comes. Guards against
    ``asyncio.wait_for`` for the answer: on Python 3.11 it then returns the answer and drops the cancel, and the loop
    heartbeat on while the drain waited for it to end (seen once in CI)."""

    class OpenChannel:
        closed = False

        async def send_str(self, text: str) -> None:
            pass

    channel = HeartbeatChannel(1.0, http=lambda: None, headers=dict, on_reply=lambda reply: None,  # type: ignore[arg-type]
                               on_secret_refused=lambda secret: None)
    channel._ws, channel._opened_for = OpenChannel(), ("ws://hub/heartbeat", "s")  # type: ignore[assignment]
    sending = asyncio.create_task(channel.send("ws://hub/heartbeat", "s", Heartbeat(), interval_s=3.0, must_ask=True))
    for _ in range(3):
        await asyncio.sleep(0)  # it has sent and waits for the answer
    channel._answered.set()  # the reader took the answer ...
    sending.cancel()  # ... in the step the drain cancels the loop
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_failed_heartbeats_are_retried_within_the_ttl_however_high_the_backoff_cap(fake_hub: Any) -> None:
    """The registration's backoff cap (FLEET_REGISTER_BACKOFF_CAP_S, 10 s by default) is longer than a worker's TTL
    (three heartbeat intervals, 9 s by default). Guards against failed heartbeats backing off up to that cap: after a
    few failures in a row the worker went a whole TTL without a heartbeat, and the hub dropped it with its sessions
    still running."""
    loop = asyncio.get_running_loop()
    interval = 0.5  # a retry each interval, a TTL of three: a second of slack for a loaded machine's delays
    attempts: list[float] = []

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": interval, "ttl_s": 3 * interval,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        attempts.append(loop.time())
        return web.Response(status=503)  # a hub whose Redis is failing over

    async with heartbeating(HubClient([await fake_hub(register, beat)], WORKER_TOKEN, registration(),
                                      SessionManager(SyntheticEngine(), 2), timeout_s=1.0, backoff_cap_s=10.0,
                                      use_channel=False)):
        await wait_for(lambda: len(attempts) >= 10, 30, "ten heartbeat attempts")
    gaps = [later - earlier for earlier, later in itertools.pairwise([*attempts, loop.time()])]
    assert len(attempts) >= 5 and max(gaps) < 3 * interval, f"{max(gaps):.2f} s between heartbeats: {gaps}"


async def test_a_hub_that_forgets_the_worker_at_once_is_not_hammered_with_registrations(fake_hub: Any) -> None:
    """A hub that accepts every registration but answers each heartbeat 404 (its Redis loses the worker's keys at
    once, say). Guards against registering again at once every time: the worker sent hundreds of registrations a
    second to a hub already in trouble. After the first, each waits a jittered backoff of at least 50 ms."""
    registrations = 0

    async def register(_: web.Request) -> web.Response:
        nonlocal registrations
        registrations += 1
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        return web.json_response({"error": "unknown_worker", "message": "no such worker"}, status=404)

    manager = SessionManager(SyntheticEngine(), 2)
    async with heartbeating(HubClient([await fake_hub(register, beat)], WORKER_TOKEN, registration(), manager,
                                      timeout_s=1.0, use_channel=False)):
        await asyncio.sleep(1.0)
    forgotten = manager.metrics.heartbeats.labels("forgotten")._value.get()
    # The first again at once, then each at least 50 ms after the one before.
    assert 2 <= registrations <= 2 + 1.0 / 0.05, f"{registrations} registrations in 1 s"
    assert forgotten >= 1


async def test_once_a_heartbeat_gets_through_the_backoff_starts_over(fake_hub: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed heartbeats back off more and more (up to the interval); one that gets through ends that. Guards against
    the backoff carrying over from an outage long past: the next lost heartbeat waited as long as the last one of
    the outage, up to a whole interval (a third of the TTL), before it was sent again."""
    drawn: list[int] = []  # for each wait, which delay of its backoff it took

    def recording_backoff(**kwargs: Any) -> Iterator[float]:
        for attempt, delay in enumerate(backoff_delays(**kwargs)):
            drawn.append(attempt)
            yield delay

    monkeypatch.setattr(hub_client, "backoff_delays", recording_backoff)
    statuses = iter([503, 503, 200, 503])

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 0.1, "ttl_s": 0.3,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        status = next(statuses, 200)
        if status != 200:
            return web.Response(status=status)
        return web.json_response({"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 2,
                                  "heartbeat_interval_s": 0.1, "stop_sessions": []})

    manager = SessionManager(SyntheticEngine(), 2)
    async with heartbeating(HubClient([await fake_hub(register, beat)], WORKER_TOKEN, registration(), manager,
                                      timeout_s=1.0, use_channel=False)):
        await wait_for(lambda: manager.metrics.heartbeats.labels("ok")._value.get() >= 2, 5, "heartbeats")
    assert drawn == [0, 1, 0], "after a heartbeat got through, the next failure waits the first, shortest delay"


async def test_of_several_failing_hubs_the_one_that_failed_last_is_tried_last(fake_hub: Any) -> None:
    """Three hubs, all failing the worker's heartbeats for now. The next heartbeat goes first to the hub that failed
    longest ago, the likeliest to be back, and last to the one that failed most recently (a frozen hub costs a whole
    timeout per request). Guards against a failing hub being put first again: each round began with the hub that had
    just failed."""
    tried: list[str] = []

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    def failing(name: str) -> Handler:
        async def beat(_: web.Request) -> web.Response:
            tried.append(name)
            return web.Response(status=503)

        return beat

    urls = [await fake_hub(register, failing(name)) for name in ("a", "b", "c")]
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       use_channel=False)
    try:
        await client.register_once()
        for _ in range(2):
            with pytest.raises(HubUnavailable):
                await client.heartbeat_once()
    finally:
        await client.aclose()
    assert tried == ["a", "b", "c", "a", "b", "c"]


def _answer(interval_s: float = 1.0) -> dict[str, Any]:
    return {"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 2,
            "heartbeat_interval_s": interval_s, "stop_sessions": []}


async def _no_registration(_: web.Request) -> web.Response:
    return web.Response(status=404)


async def _answering_channel(request: web.Request) -> web.StreamResponse:
    """A hub's heartbeat channel: answers the heartbeats that ask for it."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if Heartbeat.model_validate_json(message.data).ack:
            await ws.send_json(_answer())
    return ws


def _channel(http: aiohttp.ClientSession) -> HeartbeatChannel:
    return HeartbeatChannel(1.0, http=lambda: http, headers=dict, on_reply=lambda reply: None,
                            on_secret_refused=lambda secret: None)


async def test_on_the_channel_every_second_heartbeat_asks_for_an_answer_and_so_does_news(fake_hub: Any) -> None:
    """Asked: the first heartbeat on each channel opened, then every second one (a frozen hub is noticed within its
    TTL), and one that reports a new state (a drain the hub must confirm). Guards against asking every time (a hub
    answering every heartbeat of every worker) and against news or a new channel waiting its turn."""
    hb = f"{await fake_hub(_no_registration, _answering_channel)}/api/v1/workers/w1/heartbeat"
    ready, draining = Heartbeat(), Heartbeat(state=WorkerState.DRAINING)
    async with aiohttp.ClientSession() as http:
        channel = _channel(http)
        try:
            delivered = [await channel.send(hb, "s", beat, interval_s=1.0, must_ask=False)
                         for beat in (ready, ready, ready, draining, draining)]
            await channel.close()  # dropped (a hub restart): the next heartbeat opens another
            delivered.append(await channel.send(hb, "s", draining, interval_s=1.0, must_ask=False))
        finally:
            await channel.close()
    answered, sent = Delivery.ANSWERED, Delivery.SENT
    assert delivered == [answered, sent, answered, answered, sent, answered]


async def test_a_refused_channel_goes_by_post_to_the_same_hub_and_its_retry_delay_starts_over_once_it_opens(
        fake_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that refuses the upgrade is alive: the heartbeat is POSTed to it; one that does not answer at all gets
    the heartbeat POSTed elsewhere first. Guards against the retry delay growing on from refusals long past: a hub
    that refused once a day ago would be asked again only after minutes of POSTs."""
    upgrades_accepted = False

    async def beat(request: web.Request) -> web.StreamResponse:
        if not upgrades_accepted:
            return web.Response(status=405)
        return await _answering_channel(request)

    class Clock:
        now = 1000.0

        def monotonic(self) -> float:
            return self.now

    drawn: list[int] = []  # for each refusal, which delay of its backoff it took

    def recording_backoff(**kwargs: Any) -> Iterator[float]:
        for attempt, delay in enumerate(backoff_delays(**kwargs)):
            drawn.append(attempt)
            yield delay

    clock = Clock()
    monkeypatch.setattr(heartbeat_channel, "time", clock)
    monkeypatch.setattr(heartbeat_channel, "backoff_delays", recording_backoff)
    hb = f"{await fake_hub(_no_registration, beat)}/api/v1/workers/w1/heartbeat"
    async with aiohttp.ClientSession() as http:
        channel = _channel(http)
        try:
            delivered = []
            for accept in (False, False, True):
                upgrades_accepted = accept
                clock.now += heartbeat_channel.CHANNEL_RETRY_CAP_S + 1
                delivered.append(await channel.send(hb, "s", Heartbeat(), interval_s=1.0, must_ask=False))
            await channel.close()
            upgrades_accepted = False
            delivered.append(await channel.send(hb, "s", Heartbeat(), interval_s=1.0, must_ask=False))
            nowhere = f"http://127.0.0.1:{free_port()}/api/v1/workers/w1/heartbeat"
            delivered.append(await channel.send(nowhere, "s", Heartbeat(), interval_s=1.0, must_ask=False))
        finally:
            await channel.close()
    assert delivered == [Delivery.POST, Delivery.POST, Delivery.ANSWERED, Delivery.POST, Delivery.POST_ELSEWHERE]
    assert drawn[:3] == [0, 1, 0], "after the channel opened, the next refusal waits the first, shortest delay"


async def test_a_drained_worker_deregisters_through_another_hub_when_its_own_is_down(make_running_hub: Any) -> None:
    """Two hubs share the registry; the one the worker registered with is gone when the worker leaves. The
    deregistration goes to the other one, and the worker leaves the registry at once. Guards against trying only the
    hub that answered last: the worker stayed routable, a dead worker the hubs sent sessions to until its TTL lapsed."""
    gone, other = await make_running_hub(), await make_running_hub()
    client = HubClient([gone.url, other.url], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2),
                       timeout_s=1.0, use_channel=False)
    try:
        await client.register_once()
        assert client.hub_url == gone.url
        await gone.stop()
        assert await client.deregister() is True
    finally:
        await client.aclose()
    async with other.client() as hub:
        assert (await hub.get("/api/v1/workers/w1", headers=ADMIN_AUTH)).status_code == 404


async def test_a_hub_that_answered_and_then_failed_keeps_its_place_among_the_failing_ones(fake_hub: Any) -> None:
    """Three hubs: a is down, b answers once and then fails too, c is down. Each round begins with the hub that
    failed longest ago and ends with the one that failed last, each hub tried once. Guards against a hub's failures
    going unrecorded (the hub that just failed tried again early) and against a hub recorded twice (tried twice in
    one round, a whole timeout each when it is frozen)."""
    tried: list[str] = []

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    def hub(name: str, answers: int) -> Handler:
        async def beat(_: web.Request) -> web.Response:
            tried.append(name)
            if tried.count(name) <= answers:
                return web.json_response(_answer())
            return web.Response(status=503)

        return beat

    urls = [await fake_hub(register, hub(name, answers)) for name, answers in (("a", 0), ("b", 1), ("c", 0))]
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       use_channel=False)
    try:
        await client.register_once()
        await client.heartbeat_once()
        assert client.hub_url == urls[1]
        for _ in range(2):
            with pytest.raises(HubUnavailable):
                await client.heartbeat_once()
    finally:
        await client.aclose()
    assert tried == ["a", "b", "b", "c", "a", "b", "c", "a"]


async def test_a_hub_that_answers_a_registration_with_a_5xx_is_asked_last_from_then_on(fake_hub: Any) -> None:
    """A hub whose Redis is down answers 503: the registration goes on to the next hub, and every later request
    asks the failing hub last rather than spend a round trip on it first."""
    async def unavailable(_: web.Request) -> web.Response:
        return web.json_response({"error": "store_unavailable", "message": "Redis is down"}, status=503)

    async def accepted(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 1.0, "ttl_s": 3.0,
                                  "worker_secret": "s", "state": "ready"})

    async def unused(_: web.Request) -> web.Response:
        return web.json_response({}, status=500)

    down, up, spare = (await fake_hub(unavailable, unused), await fake_hub(accepted, unused),
                       await fake_hub(accepted, unused))
    client = HubClient([down, up, spare], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2))
    try:
        await client.register_once()
        assert client.hub_url == up and client._ordered_hubs() == [up, spare, down]
    finally:
        await client.aclose()


def test_hubs_are_asked_the_one_that_answered_first_and_those_that_failed_last_the_latest_at_the_end() -> None:
    """A frozen hub costs a timeout for every request sent to it first: the order follows what each hub did last."""
    a, b, c, d = "http://a", "http://b", "http://c", "http://d"
    client = HubClient([a, b, c, d], WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2))
    assert client._ordered_hubs() == [a, b, c, d]  # as configured, before any answer
    client._hub_answered(c)
    assert client._ordered_hubs() == [c, a, b, d]
    client._hub_failed(a)
    client._hub_failed(d)
    assert client._ordered_hubs() == [c, b, a, d]
    client._hub_failed(a)  # failed again: now the latest failure
    assert client._ordered_hubs() == [c, b, d, a]
    client._hub_failed(c)  # the hub that answered last fails: it goes to the end too
    assert client._ordered_hubs() == [b, d, a, c]
    client._hub_answered(d)  # a failing hub that answers again leads
    assert client._ordered_hubs() == [d, b, a, c]
    client.hub_urls = [b, c]  # the configuration changed: only its hubs are asked
    assert client._ordered_hubs() == [b, c]


async def test_a_hub_outage_costs_the_hubs_heartbeats_only_not_registrations_too(fake_hub: Any) -> None:
    """A heartbeat already goes to every hub in turn before it counts as failed. Registering after it, as the worker
    did, asked the same hubs the same question again: during an outage of every hub each worker doubled its
    requests, and a recovering hub met both waves at once."""
    registrations: list[str] = []
    beats: list[str] = []

    def hub(name: str) -> tuple[Handler, Handler]:
        async def register(_: web.Request) -> web.Response:
            registrations.append(name)
            return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 0.3, "ttl_s": 9.0,
                                      "worker_secret": "wsec-0123456789abcdef0123", "state": "ready"})

        async def beat(_: web.Request) -> web.Response:
            beats.append(name)
            return web.Response(status=503)

        return register, beat

    urls = [await fake_hub(*hub("a")), await fake_hub(*hub("b"))]
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       use_channel=False)
    async with heartbeating(client):
        async with asyncio.timeout(20):
            while len(beats) < 8:  # four failed heartbeats, each tried on both hubs
                await asyncio.sleep(0.05)
    assert sorted(set(beats)) == ["a", "b"]
    assert len(registrations) == 1, registrations  # the first one only


# --- a refused registration in the logs (QA finding 8) ----------------------------------------------------------


async def _refusing_hubs(fake_hub: Any, status: int, refusals: int) -> tuple[list[str], list[int]]:
    """Two hubs that refuse the registration with ``status``, ``refusals`` times between them, then accept it."""
    refused = [0]

    async def register(_: web.Request) -> web.Response:
        if refused[0] < refusals:
            refused[0] += 1
            return web.json_response({"error": "refused", "message": "as the test asks"}, status=status)
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 3.0, "ttl_s": 9.0,
                                  "worker_secret": "wsec-accepted", "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        return web.Response(status=404)

    return [await fake_hub(register, beat), await fake_hub(register, beat)], refused


@pytest.mark.parametrize(("status", "advice"), [
    (401, "refused the worker token (401): check FLEET_WORKER_TOKEN"),
    (409, "worker id w1 is still held by its previous registration (409): the hubs accept this one once it lapses"),
])
async def test_a_refused_registration_is_logged_once_saying_what_to_do_and_once_when_accepted(
        fake_hub: Any, caplog: pytest.LogCaptureFixture, status: int, advice: str) -> None:
    """Regression: a registration refused for a wrong worker token (401, a misconfiguration) or an id its previous
    registration still held (409) logged an ERROR and a WARNING at every retry of every hub."""
    urls, refused = await _refusing_hubs(fake_hub, status, refusals=12)
    caplog.set_level("DEBUG")
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       backoff_cap_s=0.05)
    try:
        await asyncio.wait_for(client.register(), 10)
    finally:
        await client.aclose()
    assert refused == [12] and client.registered.is_set()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and advice in loud[0], loud
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said[0] == "registration accepted after 12 refusals", said
    assert WORKER_TOKEN not in caplog.text


async def test_a_refusal_that_lasts_is_logged_again_at_most_once_a_period(
        fake_hub: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries go on every few seconds; the refusal's line comes again once a minute (here a fifth of a second),
    counting the refusals logged at DEBUG only."""
    monkeypatch.setattr(hub_client, "REFUSAL_LOG_EVERY_S", 0.2)
    urls, refused = await _refusing_hubs(fake_hub, 401, refusals=10**6)
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       backoff_cap_s=0.05)
    registering = asyncio.create_task(client.register())
    try:
        await asyncio.sleep(1.0)
    finally:
        registering.cancel()
        await asyncio.gather(registering, return_exceptions=True)
        await client.aclose()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 2 <= len(loud) <= 7 and len(loud) < refused[0] / 2, (len(loud), refused)
    assert all("check FLEET_WORKER_TOKEN" in line for line in loud)
    assert all(re.search(r"\(refused \d+ more times in the last \ds\)$", line) for line in loud[1:]), loud


async def _hubs_answering(fake_hub: Any, statuses: Iterator[int], body: dict[str, Any] | None = None) -> list[str]:
    """Two hubs that answer the registrations, between them, with ``statuses`` in turn (201: accepted)."""

    async def register(_: web.Request) -> web.Response:
        status = next(statuses)
        if status != 201:
            return web.json_response(body or {"error": "refused", "message": "as the test asks"}, status=status)
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 3.0, "ttl_s": 9.0,
                                  "worker_secret": "wsec-accepted", "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        return web.Response(status=404)

    return [await fake_hub(register, beat), await fake_hub(register, beat)]


async def test_a_refusal_after_an_accepted_registration_is_logged_in_full_again(
        fake_hub: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A token changed on the hubs an hour later is a new misconfiguration: its refusal is not held back as a
    repeat of one logged before the last accepted registration, and each acceptance counts its own refusals only
    (none said for a registration accepted at once)."""
    caplog.set_level(logging.INFO)
    urls = await _hubs_answering(fake_hub, iter([201, 401, 201, 401, 201]))
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       backoff_cap_s=0.05, use_channel=False)
    try:
        for _ in range(3):
            await asyncio.wait_for(client.register(), 10)
    finally:
        await client.aclose()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 2 and all("check FLEET_WORKER_TOKEN" in line for line in loud), loud
    said = [r.getMessage() for r in caplog.records if "registration accepted" in r.getMessage()]
    assert said == ["registration accepted after 1 refusals"] * 2, said


async def test_a_refusal_logged_again_counts_the_refusals_held_back_since_its_last_line(
        fake_hub: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``(refused N more times …)`` counts those since the previous line, not since the first."""
    monkeypatch.setattr(hub_client, "REFUSAL_LOG_EVERY_S", 0.2)
    caplog.set_level(logging.DEBUG, logger=hub_client.__name__)
    urls = await _hubs_answering(fake_hub, itertools.repeat(401))
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       backoff_cap_s=0.05, use_channel=False)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "check FLEET_WORKER_TOKEN" in r.getMessage()]

    registering = asyncio.create_task(client.register())
    try:
        async with asyncio.timeout(20):
            while sum(r.levelno >= logging.WARNING for r in refusals()) < 4:
                await asyncio.sleep(0.05)
    finally:
        registering.cancel()
        await asyncio.gather(registering, return_exceptions=True)
        await client.aclose()
    held_back = 0
    for record in refusals()[1:]:
        if record.levelno < logging.WARNING:
            held_back += 1
            continue
        counted = re.search(r"\(refused (\d+) more times in the last \d+s\)$", record.getMessage())
        assert counted and int(counted[1]) == held_back, (record.getMessage(), held_back)
        held_back = 0


async def test_a_registration_refused_as_invalid_says_the_hubs_reason_once(
        fake_hub: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A 422 (a field the hubs refuse) is a refusal like a 401: one line with the hub's reason, not a bare
    ``answered 422`` at every retry."""
    reason = {"error": "invalid_request", "message": "labels.engine: not a label value"}
    urls = await _hubs_answering(fake_hub, iter([422] * 6 + [201]), reason)
    client = HubClient(urls, WORKER_TOKEN, registration(), SessionManager(SyntheticEngine(), 2), timeout_s=1.0,
                       backoff_cap_s=0.05, use_channel=False)
    try:
        await asyncio.wait_for(client.register(), 10)
    finally:
        await client.aclose()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and "refused the registration (422)" in loud[0], loud
    assert "labels.engine: not a label value" in loud[0], loud
