"""The real worker agent against a REAL hub over HTTP (uvicorn in-process) with real Redis.

Guards: registration and heartbeats, dispatch end to end, re-registration after the hub loses the worker, a hub
outage that must not disturb running sessions, SIGTERM draining in a real process, and the ASG calls on drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import httpx
import pytest
from botocore.stub import Stubber

from shared import keys
from shared.models import HeartbeatReply, WorkerRegistration
from shared.redis_server import free_port
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, WORKER_TOKEN, RunningHub, flush, sync_redis, wait_for
from tests.fakes import StaticImds, served
from tests.harness import running_hubs
from worker.agent import WorkerAgent, client_audio_url, default_advertise_url
from worker.engines.synthetic import SyntheticEngine
from worker.heartbeat_channel import ACK_EVERY
from worker.hub_client import HubClient
from worker.lifecycle import Lifecycle
from worker.sessions import SessionManager
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]


def worker_settings(hub: RunningHub, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = dict(
        hub_urls=[hub.url], worker_token=WORKER_TOKEN, host="127.0.0.1", port=0, worker_id="w-agent",
        region="us-east-1", simulate_gpu="a10g", max_streams=5, imds_url=f"http://127.0.0.1:{free_port()}",
        imds_timeout_s=0.2, hub_timeout_s=1.0, register_backoff_cap_s=0.5, drain_timeout_s=0.5,
    )
    values.update(overrides)
    return WorkerSettings(**values)


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[..., Awaitable[WorkerAgent]]]:
    running: list[tuple[WorkerAgent, asyncio.Task[int]]] = []

    async def factory(settings: WorkerSettings, **kwargs: Any) -> WorkerAgent:
        agent = WorkerAgent(settings, install_signals=False, **kwargs)
        task = asyncio.create_task(agent.run())
        running.append((agent, task))
        await wait_for(lambda: agent.hub is not None and agent.hub.registered.is_set(), 10)
        return agent

    yield factory
    for agent, task in running:
        agent.request_drain("test over")
        assert await asyncio.wait_for(task, 10) == 0


async def worker_view(hub: httpx.AsyncClient, worker_id: str = "w-agent") -> dict[str, Any] | None:
    resp = await hub.get(f"/api/v1/workers/{worker_id}", headers=ADMIN_AUTH)
    return resp.json() if resp.status_code == 200 else None


async def worker_sessions(agent: WorkerAgent) -> list[str]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{agent.port}/sessions", headers=WORKER_AUTH)
    return [s["session_id"] for s in resp.json()]


async def place_session(hub: httpx.AsyncClient) -> str:
    for _ in range(40):  # the hub's routing mirror refreshes every 0.2 s
        resp = await hub.post("/api/v1/sessions", json={"identity": "alice"})
        if resp.status_code == 201:
            return str(resp.json()["session_id"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"no session placed: {resp.status_code} {resp.text}")


def spot_notice(ends: datetime) -> str:
    """What IMDS answers at spot/instance-action for an instance AWS reclaims at ``ends``."""
    return json.dumps({"action": "terminate", "time": ends.strftime("%Y-%m-%dT%H:%M:%SZ")})


async def test_registers_heartbeats_and_receives_sessions_from_the_hub(make_running_hub: Any, run_agent: Any) -> None:
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    async with running.client() as hub:
        await wait_for(lambda: agent.hub.last_reply is not None, 5, "a heartbeat reply")
        assert agent.hub.transport == "channel"  # heartbeats ride the WebSocket kept open to the hub
        view = await worker_view(hub)
        assert view and view["alive"] and view["max_streams"] == 5 and view["engine"] == "synthetic"
        assert view["gpus"] == [{"name": "NVIDIA A10G", "vram_total_mb": 24576, "simulated": True}]
        assert view["url"] == f"http://127.0.0.1:{agent.port}"
        sid = await place_session(hub)
        assert await worker_sessions(agent) == [sid]
        await wait_for(lambda: agent.hub.last_reply.used_streams == 1, 5, "the hub to count the stream")
        assert (await agent.hub.build_heartbeat()).vram_used_mb == 1536, "VRAM accounting of simulated GPUs"
        assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204
        assert await worker_sessions(agent) == []


async def test_on_the_channel_every_second_heartbeat_waits_for_an_answer(make_running_hub: Any,
                                                                        run_agent: Any) -> None:
    running = await make_running_hub(heartbeat_interval_s=0.1)
    agent = await run_agent(worker_settings(running))
    answers: list[HeartbeatReply] = []
    apply = agent.hub._channel._on_reply

    def counting(reply: HeartbeatReply) -> None:
        answers.append(reply)
        apply(reply)

    agent.hub._channel._on_reply = counting
    ok = agent.manager.metrics.heartbeats.labels("ok")
    start = ok._value.get()
    await wait_for(lambda: ok._value.get() - start >= 4 * ACK_EVERY, 10, "heartbeats")
    beats = ok._value.get() - start
    assert agent.hub.transport == "channel"
    assert beats // ACK_EVERY - 1 <= len(answers) <= beats // ACK_EVERY + 1, (beats, len(answers))
    async with running.client() as hub:  # news still comes at once, between the answered heartbeats
        assert (await hub.post("/api/v1/workers/w-agent/drain", headers=ADMIN_AUTH)).status_code == 200
        await wait_for(lambda: agent.manager.draining, 10, "the drain, as news")


async def test_news_is_applied_when_it_comes_not_at_the_next_heartbeat(make_running_hub: Any, run_agent: Any) -> None:
    """An SRE drain reaches the worker in the answer to its next heartbeat; by the heartbeat after that the worker
    must already refuse sessions (the answer was applied when it came, not queued for the next heartbeat)."""
    running = await make_running_hub(heartbeat_interval_s=0.5)
    agent = await run_agent(worker_settings(running))
    await wait_for(lambda: agent.hub.transport == "channel", 5, "the channel")
    refusing: list[bool] = []  # at each heartbeat built
    build = agent.hub.build_heartbeat

    async def recording() -> Any:
        refusing.append(agent.manager.draining)
        return await build()

    agent.hub.build_heartbeat = recording  # type: ignore[method-assign]
    async with running.client() as hub:
        assert (await hub.post("/api/v1/workers/w-agent/drain", headers=ADMIN_AUTH)).status_code == 200
    await wait_for(lambda: agent.manager.draining, 5, "the drain")
    await wait_for(lambda: True in refusing, 5, "a heartbeat built while draining")
    assert refusing.count(False) <= 1, refusing


async def test_heartbeats_fall_back_to_post_when_the_channel_is_refused(
    make_running_hub: Any, run_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise aiohttp.ClientConnectionError("a proxy that does not upgrade")

    monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", refuse)
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    await wait_for(lambda: agent.manager.metrics.heartbeats.labels("ok")._value.get() >= 2, 5, "two heartbeats")
    assert agent.hub.transport == "post" and agent.manager.metrics.heartbeats.labels("failed")._value.get() == 0
    async with running.client() as hub:
        assert await place_session(hub) in await worker_sessions(agent)


async def test_a_refused_upgrade_never_puts_the_worker_token_or_secret_in_the_logs(
    make_running_hub: Any, run_agent: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's handshake error carries the request's headers in its repr: the bearer token and the secret."""
    from aiohttp.client_reqrep import RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    async def refuse(self: Any, url: str, *, headers: dict[str, str], **kwargs: Any) -> None:
        info = RequestInfo(URL(url), "GET", CIMultiDictProxy(CIMultiDict(headers)), URL(url))
        raise aiohttp.WSServerHandshakeError(info, (), status=403, message="Invalid response status")

    monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", refuse)
    caplog.set_level("DEBUG")
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    await wait_for(lambda: agent.manager.metrics.heartbeats.labels("ok")._value.get() >= 1, 5, "a heartbeat")
    assert "heartbeat channel unavailable" in caplog.text
    assert WORKER_TOKEN not in caplog.text and agent.hub.secret and agent.hub.secret not in caplog.text


async def test_an_unexpected_heartbeat_failure_does_not_stop_the_heartbeats(make_running_hub: Any,
                                                                            run_agent: Any) -> None:
    running = await make_running_hub(heartbeat_interval_s=0.2)
    agent = await run_agent(worker_settings(running))
    build = agent.hub.build_heartbeat
    failures = 2

    async def broken_probe() -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise ValueError("cannot convert float NaN to integer")  # e.g. a GPU probe's bad reading
        return await build()

    agent.hub.build_heartbeat = broken_probe  # type: ignore[method-assign]
    ok = agent.manager.metrics.heartbeats.labels("ok")
    start = ok._value.get()
    await wait_for(lambda: ok._value.get() >= start + 2, 5, "heartbeats after the failures")
    assert failures == 0 and agent.manager.metrics.heartbeats.labels("failed")._value.get() >= 2


async def test_reregisters_when_the_hub_loses_the_worker(make_running_hub: Any, run_agent: Any,
                                                         redis_url: str) -> None:
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    assert agent.hub.registrations == 1
    flush(sync_redis(redis_url))  # the hub's whole state is gone
    await wait_for(lambda: agent.hub.registrations >= 2, 5, "re-registration")
    async with running.client() as hub:
        await wait_for(lambda: agent.hub.last_reply is not None, 5)
        view = await worker_view(hub)
        assert view and view["alive"]
        assert await place_session(hub) in await worker_sessions(agent)


async def test_a_leaving_worker_registers_again_as_draining(make_running_hub: Any, run_agent: Any,
                                                            redis_url: str) -> None:
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    agent.manager.set_draining(True)  # its own drain (a spot notice, scale-in) is under way
    answers: list[Any] = []
    register_once = agent.hub.register_once

    async def recorded() -> Any:
        answers.append(await register_once())
        return answers[-1]

    agent.hub.register_once = recorded  # type: ignore[method-assign]
    flush(sync_redis(redis_url))  # the hub forgets the worker; the next heartbeat learns it
    await wait_for(lambda: answers, 5, "re-registration")
    assert answers[0].state == "draining", "the registration alone keeps it out of routing"


async def test_health_says_unregistered_while_the_worker_registers_again(make_running_hub: Any, run_agent: Any,
                                                                        redis_url: str) -> None:
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))

    async def health() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            answer: dict[str, Any] = (await client.get(f"http://127.0.0.1:{agent.port}/health")).json()
        return answer

    before = await health()
    assert before["registered"] is True and before["hub"] == running.url and before["worker_id"] == "w-agent"
    gate = asyncio.Event()
    register_once = agent.hub.register_once

    async def held_back() -> Any:  # the hubs do not take the registration until the gate opens
        await gate.wait()
        return await register_once()

    agent.hub.register_once = held_back  # type: ignore[method-assign]
    flush(sync_redis(redis_url))  # the hub forgets the worker; the next heartbeat learns it
    deadline = asyncio.get_running_loop().time() + 5
    while (await health())["registered"]:
        assert asyncio.get_running_loop().time() < deadline, "/health kept saying registered"
        await asyncio.sleep(0.05)
    gate.set()
    await wait_for(lambda: agent.hub.registrations >= 2, 5, "re-registration")
    assert (await health())["registered"] is True


@pytest.mark.parametrize("transport", ["channel", "post"])
async def test_a_refused_secret_leads_to_a_fresh_registration(make_running_hub: Any, run_agent: Any, transport: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the channel and over POST (behind a proxy that refuses the upgrade) alike."""
    if transport == "post":
        async def refuse(*args: Any, **kwargs: Any) -> None:
            raise aiohttp.ClientConnectionError("a proxy that does not upgrade")

        monkeypatch.setattr(aiohttp.ClientSession, "ws_connect", refuse)
    running = await make_running_hub()
    agent = await run_agent(worker_settings(running))
    agent.hub.secret = "not-the-secret"
    # 403 → the secret is dropped → 409 while the old registration lives → accepted once its TTL (2 s) lapses.
    await wait_for(lambda: agent.hub.registrations >= 2, 8, "re-registration after 403")
    await wait_for(lambda: agent.hub.last_reply is not None, 5)
    assert agent.manager.metrics.heartbeats.labels("forgotten")._value.get() >= 1


async def test_hub_outage_keeps_sessions_and_the_worker_comes_back(make_running_hub: Any, run_agent: Any) -> None:
    running = await make_running_hub(worker_ttl_s=1.0, active_lease_s=30.0)
    agent = await run_agent(worker_settings(running))
    async with running.client() as hub:
        sid = await place_session(hub)
    await running.stop()
    await asyncio.sleep(1.5)  # longer than the TTL: the worker is stale when the hub returns
    assert await worker_sessions(agent) == [sid], "a hub outage must not touch running sessions"
    failed = agent.manager.metrics.heartbeats.labels("failed")._value.get()
    assert failed >= 1
    await running.start()
    async with running.client() as hub:
        await wait_for(lambda: agent.hub.last_reply is not None and agent.hub.last_reply.used_streams == 1, 8,
                       "heartbeats to resume")
        view = await worker_view(hub)
        assert view and view["alive"] and view["used_streams"] == 1
    assert await worker_sessions(agent) == [sid]


async def test_sre_drain_and_resume_through_the_hub_reach_the_worker(make_running_hub: Any, run_agent: Any) -> None:
    running = await make_running_hub(heartbeat_interval_s=0.3)
    agent = await run_agent(worker_settings(running))
    async with running.client() as hub:
        assert (await hub.post("/api/v1/workers/w-agent/drain", headers=ADMIN_AUTH)).status_code == 200
        await wait_for(lambda: agent.manager.draining, 5, "the worker to learn it is draining")
        await asyncio.sleep(1.0)  # heartbeats go on while drained; none may pin the hub's state at draining
        assert (await hub.post("/api/v1/workers/w-agent/resume", headers=ADMIN_AUTH)).json()["state"] == "ready"
        await wait_for(lambda: not agent.manager.draining, 5, "the worker to learn it may take sessions again")
        await asyncio.sleep(1.0)
        view = await worker_view(hub)
        assert view and view["state"] == "ready" and not view["drain_requested"]
        assert await place_session(hub) in await worker_sessions(agent)


async def test_an_sre_drain_outlives_a_redis_that_restarts_empty(make_running_hub: Any, run_agent: Any,
                                                                 redis_url: str) -> None:
    """Regression: the worker registered again as `ready` after Redis lost its keys, the hub (no drain flag any more)
    answered `ready`, and the worker took sessions again though nobody had resumed it."""
    running = await make_running_hub(heartbeat_interval_s=0.3)
    agent = await run_agent(worker_settings(running))
    async with running.client() as hub:
        assert (await hub.post("/api/v1/workers/w-agent/drain", headers=ADMIN_AUTH)).status_code == 200
        await wait_for(lambda: agent.manager.drained_by_hub, 5, "the worker to learn it is drained")
        registrations = agent.hub.registrations
        flush(sync_redis(redis_url))  # Redis restarts empty
        await wait_for(lambda: agent.hub.registrations > registrations, 5, "re-registration")
        ok = agent.manager.metrics.heartbeats.labels("ok")
        beats = ok._value.get()
        await wait_for(lambda: ok._value.get() >= beats + 2, 5, "heartbeats after the registration")
        view = await worker_view(hub)
        assert view and view["alive"] and view["state"] == "draining" and view["drain_requested"]
        assert agent.manager.draining and agent.manager.drained_by_hub
        refused = await hub.post("/api/v1/sessions", json={"identity": "alice"})
        assert refused.status_code == 503 and await worker_sessions(agent) == []
        assert (await hub.post("/api/v1/workers/w-agent/resume", headers=ADMIN_AUTH)).json()["state"] == "ready"
        await wait_for(lambda: not agent.manager.draining, 5, "the worker to learn it may take sessions again")
        assert await place_session(hub) in await worker_sessions(agent)


async def test_sigterm_drains_deregisters_and_exits_zero(make_running_hub: Any) -> None:
    running = await make_running_hub()
    env = {**os.environ, "FLEET_HUB_URLS": running.url, "FLEET_WORKER_TOKEN": WORKER_TOKEN,
           "FLEET_WORKER_ID": "w-proc", "FLEET_IMDS_URL": f"http://127.0.0.1:{free_port()}",
           "FLEET_DRAIN_TIMEOUT_S": "1.0", "FLEET_HOST": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "--port", "0", "--simulate-gpu",
                                                "t4", "--max-streams", "2", env=env, cwd=ROOT)
    try:
        async with running.client() as hub:
            for _ in range(100):
                view = await worker_view(hub, "w-proc")
                if view and view["alive"]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("worker process never registered")
            await place_session(hub)
            proc.send_signal(signal.SIGTERM)
            seen_draining = False
            for _ in range(40):
                view = await worker_view(hub, "w-proc")
                if view is None:
                    break
                seen_draining = seen_draining or view["state"] == "draining"
                await asyncio.sleep(0.05)
            assert seen_draining, "the hub must learn of the drain at once, not at the next heartbeat"
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert await worker_view(hub, "w-proc") is None, "a drained worker deregisters"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def stubbed_autoscaling() -> tuple[Any, Stubber]:
    client = boto3.client("autoscaling", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client, Stubber(client)


async def test_scale_in_protection_follows_sessions_and_drain_completes_the_lifecycle_action(
        make_running_hub: Any, run_agent: Any) -> None:
    client, stub = stubbed_autoscaling()
    protection = {"InstanceIds": ["i-1"], "AutoScalingGroupName": "asg-gpu"}
    # The start lifts any protection a crashed predecessor left on, then it follows the session.
    stub.add_response("set_instance_protection", {}, {**protection, "ProtectedFromScaleIn": False})
    stub.add_response("set_instance_protection", {}, {**protection, "ProtectedFromScaleIn": True})
    stub.add_response("set_instance_protection", {}, {**protection, "ProtectedFromScaleIn": False})
    stub.add_response("complete_lifecycle_action", {}, {
        "LifecycleHookName": "drain-hook", "AutoScalingGroupName": "asg-gpu", "LifecycleActionResult": "CONTINUE",
        "InstanceId": "i-1"})
    stub.activate()
    lifecycle = Lifecycle(client, "i-1", "asg-gpu", "drain-hook")
    running = await make_running_hub()
    settings = worker_settings(running, protect_from_scale_in=True, lifecycle_hook_name="drain-hook")
    agent = WorkerAgent(settings, lifecycle=lifecycle, imds=StaticImds("i-1"), install_signals=False)
    task = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.hub is not None and agent.hub.registered.is_set(), 10)
    async with running.client() as hub:
        sid = await place_session(hub)
        await wait_for(lambda: lifecycle.protected is True, 5, "protection on")
        await hub.delete(f"/api/v1/sessions/{sid}")
        await wait_for(lambda: lifecycle.protected is False, 5, "protection off")
    agent.request_drain("scale-in")
    assert await asyncio.wait_for(task, 10) == 0
    stub.assert_no_pending_responses()


def test_lifecycle_without_a_group_skips_the_call() -> None:
    client, stub = stubbed_autoscaling()
    stub.activate()
    assert Lifecycle(client, "i-1", None, "hook").complete() is False
    stub.add_client_error("complete_lifecycle_action", "ValidationError", "No active Lifecycle Action found")
    assert Lifecycle(client, "i-1", "asg", "hook").complete() is False  # logged, never raised: exit goes on


async def test_a_dead_first_hub_url_falls_over_to_the_next(make_running_hub: Any, run_agent: Any) -> None:
    running = await make_running_hub()
    dead = f"http://127.0.0.1:{free_port()}"
    agent = await run_agent(worker_settings(running, hub_urls=[dead, running.url]))
    assert agent.hub.hub_url == running.url


@pytest.mark.standalone_redis
@pytest.mark.parametrize("use_channel", [True, False], ids=["channel", "post"])
async def test_a_frozen_hub_hands_the_heartbeats_to_the_next_url_within_the_ttl(redis_url: str,
                                                                                 use_channel: bool) -> None:
    """Two hub processes share Redis; the one the worker heartbeats to freezes (SIGSTOP) holding its connections.
    The heartbeat that fails there (no answer on the channel, or a POST timing out) must go to the other hub at
    once, and a registration after it must try the frozen hub last. Guards against a worker that POSTed the lost
    heartbeat to the frozen hub, backed off and registered there first: 4.7 intervals without a heartbeat against
    a TTL of 3, so a live worker left routing."""
    # The worker's worst gap is about two intervals (the next heartbeat, then its timeout) against a TTL of three,
    # and what comes on top (a registration elsewhere, two processes on a loaded machine) took half a second of a
    # 1 s interval's slack in CI-like load: a 2 s interval leaves two seconds of slack for it.
    interval = 2.0
    with running_hubs(2, redis_url, heartbeat_interval_s=interval, worker_ttl_s=3 * interval) as (frozen, other):
        redis = sync_redis(redis_url)
        reg = WorkerRegistration(worker_id="w-freeze", url="http://127.0.0.1:1", region="us-east-1", max_streams=2)
        # The hub timeout equal to the interval, as in the defaults (3 s and 3 s, TTL 9 s).
        client = HubClient([frozen.url, other.url], WORKER_TOKEN, reg, SessionManager(SyntheticEngine(), 2),
                           timeout_s=interval, backoff_cap_s=interval, use_channel=use_channel)
        loop: asyncio.Task[None] | None = None
        assert frozen.proc is not None
        try:
            await client.register()
            loop = asyncio.create_task(client.heartbeat_loop())
            await wait_for(lambda: client.manager.metrics.heartbeats.labels("ok")._value.get() >= 2, 20, "heartbeats")
            assert client.hub_url == frozen.url and client.transport == ("channel" if use_channel else "post")

            def last_heartbeat_ms() -> int:
                return int(redis.hget(keys.worker_keys("w-freeze").info, "hb") or 0)

            seen = [last_heartbeat_ms()]
            os.kill(frozen.proc.pid, signal.SIGSTOP)
            for _ in range(80):  # 4 intervals
                await asyncio.sleep(interval / 20)
                if last_heartbeat_ms() != seen[-1]:
                    seen.append(last_heartbeat_ms())
            seconds, micros = redis.time()
            seen.append(seconds * 1000 + micros // 1000)  # and the time since the last one
            worst = max(later - earlier for earlier, later in itertools.pairwise(seen)) / 1000
            assert worst < 3 * interval, f"{worst:.2f} s without a heartbeat; the TTL is {3 * interval:.0f} s"
            assert client.hub_url == other.url
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            started = asyncio.get_running_loop().time()
            await client.register_once()
            took = asyncio.get_running_loop().time() - started
            assert client.hub_url == other.url and took < interval / 2, f"registration took {took:.2f} s"
        finally:
            if loop is not None:
                loop.cancel()
                await asyncio.gather(loop, return_exceptions=True)
            os.kill(frozen.proc.pid, signal.SIGCONT)
            await client.aclose()


async def test_spot_interruption_notice_drains_the_worker(make_running_hub: Any, run_agent: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    import worker.agent

    monkeypatch.setattr(worker.agent, "WATCH_INTERVAL_S", 0.1)
    meta: dict[str, str | bytes] = {"instance-id": "i-0spot", "placement/region": "us-east-1",
                                    "local-ipv4": "127.0.0.1"}

    async def token(_: web.Request) -> web.Response:
        return web.Response(text="t")

    async def get(request: web.Request) -> web.Response:
        value = meta.get(request.match_info["path"])
        return web.Response(body=value.encode() if isinstance(value, str) else value) if value else \
            web.Response(status=404)

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/{path:.+}", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    imds_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", imds_port).start()
    try:
        running = await make_running_hub()
        # The configured drain would wait a minute for sessions; the notice leaves two (here: 2 s past the margin).
        settings = worker_settings(running, worker_id=None, imds_url=f"http://127.0.0.1:{imds_port}",
                                   drain_timeout_s=60)
        agent = WorkerAgent(settings, install_signals=False)
        task = asyncio.create_task(agent.run())
        await wait_for(lambda: agent.hub is not None and agent.hub.registered.is_set(), 10)
        assert agent.hub is not None and agent.hub.worker_id == "i-0spot", "on EC2 the instance id is the worker id"
        async with running.client() as hub:
            await place_session(hub)
        meta["spot/instance-action"] = b"\xff\xfe not text"  # one bad answer must not end the watch
        await asyncio.sleep(0.3)
        assert not task.done() and agent.drain_reason is None
        ends = datetime.now(UTC) + timedelta(seconds=worker.agent.SPOT_MARGIN_S + 2)
        meta["spot/instance-action"] = spot_notice(ends)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(task, 10) == 0
        assert asyncio.get_running_loop().time() - started < 8, "the drain ends before the instance does"
        assert agent.drain_reason and "spot" in agent.drain_reason
        assert agent.manager.sessions == {}, "what still ran was stopped"
        async with running.client() as hub:
            assert await worker_view(hub, "i-0spot") is None
    finally:
        await runner.cleanup()


def test_lifecycle_from_settings_prefers_the_configured_group() -> None:
    from worker.imds import InstanceIdentity

    ident = InstanceIdentity("i-1", None, "eu-west-1", None, None, None)
    settings = WorkerSettings(autoscaling_group="asg-a", lifecycle_hook_name="hook")
    lifecycle = Lifecycle.from_settings(settings, ident, "asg-from-tags")
    assert (lifecycle.group, lifecycle.hook_name, lifecycle.client.meta.region_name) == ("asg-a", "hook", "eu-west-1")


async def test_a_failing_or_malformed_hub_is_retryable_and_leaves_sessions_alone() -> None:
    from aiohttp import web

    from shared.models import SessionDispatch, WorkerRegistration
    from worker.engines.synthetic import SyntheticEngine
    from worker.hub_client import HubClient
    from worker.hub_errors import HubUnavailable
    from worker.sessions import SessionManager

    answers = iter([web.Response(status=500), web.Response(text="not json"), web.json_response({"worker_id": 1})])

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": 0.1, "ttl_s": 1, "worker_secret": "s",
                                  "state": "ready"})

    async def beat(_: web.Request) -> web.Response:
        return next(answers)

    app = web.Application()
    app.router.add_post("/api/v1/workers", register)
    app.router.add_post("/api/v1/workers/w1/heartbeat", beat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    manager = SessionManager(SyntheticEngine(), max_streams=2)
    await manager.start(SessionDispatch(session_id="s1", room="r", livekit_url="ws://x", token="t"))
    reg = WorkerRegistration(worker_id="w1", url="http://127.0.0.1:1", region="us-east-1", max_streams=2)
    client = HubClient([f"http://127.0.0.1:{port}"], "tok", reg, manager, timeout_s=1.0)
    try:
        assert (await client.register_once()).worker_secret == "s" and client.interval_s == 0.1
        for _ in range(3):  # 5xx, not JSON, JSON of the wrong shape
            with pytest.raises(HubUnavailable):
                await client.heartbeat_once()
        assert manager.ids() == ["s1"]
    finally:
        await client.aclose()
        await manager.stop_all()
        await runner.cleanup()


@pytest.mark.parametrize("use_channel", [True, False], ids=["channel", "post"])
async def test_a_session_that_ends_on_its_own_is_told_to_the_hub_at_once(make_running_hub: Any, run_agent: Any,
                                                                          use_channel: bool) -> None:
    """The hub holds a session, and hands it to a client presenting its ``session_key``, until a heartbeat leaves
    it out. Regression: a user who reconnected right after the agent left (LiveKit's participant_left) got the ended
    session back for up to an interval and joined an empty room. The interval here is 30 s: only the heartbeat sent
    for the end can free it within the test's 2 s."""
    running = await make_running_hub(heartbeat_interval_s=30.0, worker_ttl_s=90.0)
    agent = await run_agent(worker_settings(running, heartbeat_channel=use_channel),
                            engine=SyntheticEngine(session_duration_s=0.5))
    key = {"session_key": "reconnect-0123456789abcdef"}
    loop = asyncio.get_running_loop()
    async with running.client() as hub:
        await wait_for(lambda: agent.hub.last_reply is not None, 5, "the first heartbeat's answer")
        first = await hub.post("/api/v1/sessions", json=key)
        assert first.status_code == 201, first.text
        sid = first.json()["session_id"]
        await wait_for(lambda: sid not in agent.manager.sessions, 5, "the session's own end")
        ended_at = loop.time()
        while (await hub.get(f"/api/v1/sessions/{sid}")).status_code != 404:
            assert loop.time() - ended_at < 2.0, "the hub still holds the session the worker ended"
            await asyncio.sleep(0.05)
        again = await hub.post("/api/v1/sessions", json=key)
        assert again.status_code == 201 and again.json()["session_id"] != sid, again.text


@contextlib.asynccontextmanager
async def _heartbeats_to_a_fake_hub(manager: SessionManager,
                                    answer: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], *,
                                    interval_s: float = 30.0) -> AsyncIterator[None]:
    """A hub that registers ``w1`` at ``interval_s`` and answers each POSTed heartbeat with ``await answer(body)``,
    and a worker heartbeating to it over POST until the block ends."""
    from aiohttp import web

    async def register(_: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "heartbeat_interval_s": interval_s, "ttl_s": 3 * interval_s,
                                  "worker_secret": "s", "state": "ready"})

    async def beat(request: web.Request) -> web.Response:
        return web.json_response({"worker_id": "w1", "state": "ready", "used_streams": 0, "max_streams": 64,
                                  "heartbeat_interval_s": interval_s, **(await answer(await request.json()))})

    app = web.Application()
    app.router.add_post("/api/v1/workers", register)
    app.router.add_post("/api/v1/workers/w1/heartbeat", beat)
    async with served(app) as port:
        reg = WorkerRegistration(worker_id="w1", url="http://127.0.0.1:1", region="us-east-1", max_streams=64)
        client = HubClient([f"http://127.0.0.1:{port}"], "tok", reg, manager, timeout_s=2.0, use_channel=False)
        loop: asyncio.Task[None] | None = None
        try:
            await client.register_once()
            loop = asyncio.create_task(client.heartbeat_loop())
            yield
        finally:
            if loop is not None:
                loop.cancel()
                await asyncio.gather(loop, return_exceptions=True)
            await client.aclose()
            await manager.stop_all()


async def test_a_burst_of_ends_is_told_in_one_heartbeat() -> None:
    """Sessions that end together (a room closing, an engine failing) cost the hub one heartbeat, not one each."""
    from shared.models import SessionDispatch

    manager = SessionManager(SyntheticEngine(), max_streams=8)
    for n in range(5):
        await manager.start(SessionDispatch(session_id=f"s{n}", room="r", livekit_url="ws://x", token="t"))
    bodies: list[dict[str, Any]] = []

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        bodies.append(body)
        return {}

    async with _heartbeats_to_a_fake_hub(manager, answer):
        await wait_for(lambda: len(bodies) == 1, 5, "the first heartbeat")
        assert len(bodies[0]["active_sessions"]) == 5
        for n in range(5):
            manager._ended(f"s{n}", "room closed")  # the engine's callback, as a room closing calls it
        await wait_for(lambda: len(bodies) == 2, 2, "the heartbeat that tells the ends")
        await asyncio.sleep(0.5)
        assert len(bodies) == 2 and bodies[1]["active_sessions"] == []


async def test_a_slow_heartbeat_answer_does_not_stretch_the_interval() -> None:
    """Heartbeats start an interval apart, however long the hub takes to answer each: a loop that slept a whole
    interval after every answer made each gap the hub saw an interval plus an answer, eating into the TTL of three
    intervals (a hub answering in 0.8 of an interval left 1.8 between heartbeats)."""
    interval, answer_s = 1.0, 0.8  # 1.8 s apart before, 1.0 now: a loaded machine's lateness fits in between
    manager = SessionManager(SyntheticEngine(), max_streams=2)
    arrivals: list[float] = []

    async def answer(_: dict[str, Any]) -> dict[str, Any]:
        arrivals.append(asyncio.get_running_loop().time())
        await asyncio.sleep(answer_s)
        return {}

    async with _heartbeats_to_a_fake_hub(manager, answer, interval_s=interval):
        await wait_for(lambda: len(arrivals) >= 5, 20, "five heartbeats")
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        mean = sum(gaps) / len(gaps)
        assert manager.metrics.heartbeats.labels("failed")._value.get() == 0
        assert mean < interval + answer_s / 2, f"heartbeats {mean:.2f} s apart at an interval of {interval} s"


async def test_sessions_ending_one_after_another_do_not_make_the_worker_heartbeat_back_to_back() -> None:
    """A session that ends while a heartbeat is on its way is told by the next one, a quarter of a second after that
    one began, not straight after its answer: ends that keep coming (a room emptying user by user) must not make
    the worker send heartbeats back to back."""
    from shared.models import SessionDispatch

    manager = SessionManager(SyntheticEngine(), max_streams=64)
    for n in range(60):
        await manager.start(SessionDispatch(session_id=f"s{n}", room="r", livekit_url="ws://x", token="t"))
    clock = asyncio.get_running_loop().time
    arrivals: list[float] = []

    async def answer(_: dict[str, Any]) -> dict[str, Any]:
        arrivals.append(clock())
        if manager.sessions:
            manager._ended(next(iter(manager.sessions)), "user left")  # another end while this heartbeat is answered
        return {}

    async with _heartbeats_to_a_fake_hub(manager, answer):
        await wait_for(lambda: arrivals and clock() - arrivals[0] > 2.0, 10, "two seconds of heartbeats")
        told = [t for t in arrivals if t - arrivals[0] <= 2.0]
        assert 2 <= len(told) <= 16, f"{len(told)} heartbeats in 2 s, each telling one end"


async def test_a_session_the_hub_asks_to_stop_brings_no_heartbeat_forward() -> None:
    """The hub that asked for the stop already holds the session no more: the next heartbeat keeps its interval, even
    when the engine's own end of the session (the room closed as it was stopped) comes in after the stop."""
    from shared.models import SessionDispatch

    manager = SessionManager(SyntheticEngine(), max_streams=64)
    await manager.start(SessionDispatch(session_id="s0", room="r", livekit_url="ws://x", token="t"))
    bodies: list[dict[str, Any]] = []

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        bodies.append(body)
        return {"stop_sessions": body["active_sessions"]}

    async with _heartbeats_to_a_fake_hub(manager, answer):
        await wait_for(lambda: not manager.sessions, 5, "the stop the hub asked for")
        manager._ended("s0", "room closed")  # the engine's callback, late
        await asyncio.sleep(1.0)
        assert len(bodies) == 1, bodies


def test_the_audio_websocket_is_announced_in_its_public_form() -> None:
    path = "/sessions/{session_id}/audio"
    assert client_audio_url("https://w1.example.com/", path) == "wss://w1.example.com/sessions/{session_id}/audio"
    assert client_audio_url("http://10.0.0.5:8081", path) == "ws://10.0.0.5:8081/sessions/{session_id}/audio"
    assert client_audio_url("http://10.0.0.5:8081", None) is None  # the synthetic engine serves no audio


@pytest.mark.parametrize(("bound", "private_ip", "url"), [
    ("0.0.0.0", None, "http://gpu-box-7:8100"),  # every interface: where it is, the machine's name says
    ("::", None, "http://gpu-box-7:8100"),
    ("", None, "http://gpu-box-7:8100"),
    ("0.0.0.0", "10.1.2.3", "http://10.1.2.3:8100"),  # on EC2: the private IP, whatever is bound
    ("127.0.0.1", None, "http://127.0.0.1:8100"),
    ("10.0.0.5", None, "http://10.0.0.5:8100"),
    ("worker-1.internal", None, "http://worker-1.internal:8100"),
    ("::1", None, "http://[::1]:8100"),
    ("fd00::5", None, "http://[fd00::5]:8100"),
])
def test_the_default_advertised_url(monkeypatch: pytest.MonkeyPatch, bound: str, private_ip: str | None,
                                    url: str) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box-7")
    assert default_advertise_url(bound, 8100, private_ip) == url


@pytest.mark.parametrize(("bound", "url"), [("0.0.0.0", "http://gpu-box-7:8100"), ("::1", "http://[::1]:8100")])
def test_the_registration_advertises_where_a_hub_reaches_the_worker(monkeypatch: pytest.MonkeyPatch, bound: str,
                                                                    url: str) -> None:
    """Regression: bound to every interface off EC2, the worker advertised 127.0.0.1, so a hub on another machine
    dispatched to itself; bound to ::1 it advertised http://::1:8100 and crashed at start."""
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box-7")
    agent = WorkerAgent(WorkerSettings(host=bound, port=8100, region="us-east-1"), engine=SyntheticEngine(),
                        install_signals=False)
    assert agent._registration(4).url == url


class AudioEngine(SyntheticEngine):
    client_audio_path = "/sessions/{session_id}/audio"


def test_configured_names_win_over_instance_metadata_and_clients_get_the_public_audio_url() -> None:
    """FLEET_WORKER_ID, FLEET_REGION and FLEET_ZONE, when set, are what the worker registers as, on EC2 too;
    without them the instance metadata names it. The audio WebSocket is announced at FLEET_PUBLIC_URL, where clients
    reach the worker, not at the private address hubs use."""
    ident = StaticImds("i-0abc").ident
    configured = WorkerAgent(WorkerSettings(host="0.0.0.0", port=8100, worker_id="gpu-7", region="eu-west-1",
                                            zone="eu-west-1b", public_url="https://voice.example.com"),
                             engine=AudioEngine(), install_signals=False)
    configured.identity = ident
    reg = configured._registration(4)
    assert (reg.worker_id, reg.region, reg.zone) == ("gpu-7", "eu-west-1", "eu-west-1b")
    assert reg.url == "http://127.0.0.1:8100"  # hubs: the private IP
    assert reg.audio_url == "wss://voice.example.com/sessions/{session_id}/audio"
    from_metadata = WorkerAgent(WorkerSettings(host="0.0.0.0", port=8100), engine=AudioEngine(),
                                install_signals=False)
    from_metadata.identity = ident
    reg = from_metadata._registration(4)
    assert (reg.worker_id, reg.region, reg.zone) == ("i-0abc", "us-east-1", "us-east-1a")
    assert reg.audio_url == "ws://127.0.0.1:8100/sessions/{session_id}/audio"
