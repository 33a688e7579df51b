"""The worker's drain when something beside it fails: a GPU probe or a hub that never answers, an engine that cannot
close, a spot notice that comes after the drain began. The real agent against a real hub and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

import worker.agent
import worker.gpus
from shared.redis_server import free_port
from tests.conftest import wait_for
from tests.test_worker_hub import place_session, stubbed_autoscaling, worker_settings
from worker.agent import WorkerAgent
from worker.engines.synthetic import SyntheticEngine
from worker.gpus import Gpu
from worker.lifecycle import Lifecycle


@contextlib.asynccontextmanager
async def running(agent: WorkerAgent) -> AsyncIterator[asyncio.Task[int]]:
    """The agent's run() as a task, registered; stopped (twice signalled) if the test left it running."""
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agent.hub is not None and agent.hub.registered.is_set(), 10, "registration")
        yield task
    finally:
        if not task.done():
            agent.request_drain("SIGTERM")
            agent.request_drain("SIGTERM")
            await asyncio.gather(asyncio.wait_for(task, 10), return_exceptions=True)


async def test_a_hung_gpu_probe_neither_stops_the_heartbeats_nor_holds_the_drain(
        make_running_hub: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """GPUtil runs nvidia-smi without a timeout and nvmlInit can block. Guards against a probe that never answers
    silently ending the heartbeats (the hub dropped the live worker) and then holding the drain for good."""
    release = threading.Event()
    probes = 0

    def hung(gpus: list[Gpu], vram_used_by_engine_mb: int = 0) -> list[Gpu]:
        nonlocal probes
        probes += 1
        release.wait(60)
        return gpus

    hub = await make_running_hub(heartbeat_interval_s=0.2)
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=0.5), install_signals=False)
    try:
        async with running(agent) as task:
            monkeypatch.setattr(worker.gpus, "refresh", hung)
            ok = agent.manager.metrics.heartbeats.labels("ok")
            start = ok._value.get()
            await wait_for(lambda: ok._value.get() >= start + 5, 5, "heartbeats while the probe hangs")
            assert probes == 1, "a second probe must not pile up behind the hung one"
            assert caplog.text.count("the GPU probe has not answered") == 1, "warned once, not at every heartbeat"
            agent.request_drain("SIGTERM")
            assert await asyncio.wait_for(task, 5) == 0
    finally:
        release.set()


@pytest.mark.parametrize("second_signal", [False, True])
async def test_a_drain_heartbeat_that_never_ends_holds_neither_the_drain_nor_a_second_signal(
        make_running_hub: Any, second_signal: bool) -> None:
    """The drain's own heartbeat tells the hub at once; a hub that takes it and never answers must hold the drain
    no longer than the hub timeout, and a second SIGTERM not at all. Guards against an unbounded wait there."""
    hub = await make_running_hub()
    settings = worker_settings(hub, drain_timeout_s=60, hub_timeout_s=30 if second_signal else 0.5)
    agent = WorkerAgent(settings, install_signals=False)
    async with running(agent) as task:
        async with hub.client() as client:
            await place_session(client)
        never = asyncio.Event()

        async def unanswered() -> None:
            await never.wait()

        agent.hub.heartbeat_once = unanswered  # type: ignore[method-assign]
        agent.request_drain("SIGTERM")
        if second_signal:
            await asyncio.sleep(0.2)
            agent.request_drain("SIGTERM")
        else:
            await asyncio.sleep(1.5)  # past the heartbeat's bound: the drain now waits for the session
            assert not task.done() and agent.manager.sessions
            agent.request_drain("SIGTERM")
        assert await asyncio.wait_for(task, 5) == 0
        assert agent.manager.sessions == {}


class ClosingFails(SyntheticEngine):
    async def aclose(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_an_engine_that_fails_to_close_leaves_the_rest_of_the_exit_alone(make_running_hub: Any) -> None:
    """Guards against one failing close step skipping the others: the ASG kept waiting for the lifecycle hook's
    timeout, the HTTP and IMDS sessions stayed open and the process exited 1 after a drain."""
    client, stub = stubbed_autoscaling()
    stub.add_response("complete_lifecycle_action", {}, {
        "LifecycleHookName": "drain-hook", "AutoScalingGroupName": "asg-gpu", "LifecycleActionResult": "CONTINUE",
        "InstanceId": "i-1"})
    stub.activate()
    hub = await make_running_hub()
    port = free_port()
    imds = await fake_imds({"instance-id": "i-1", "local-ipv4": "127.0.0.1"}, port)
    try:
        settings = worker_settings(hub, lifecycle_hook_name="drain-hook", imds_url=f"http://127.0.0.1:{port}")
        lifecycle = Lifecycle(client, "i-1", "asg-gpu", "drain-hook")
        agent = WorkerAgent(settings, engine=ClosingFails(), lifecycle=lifecycle, install_signals=False)
        async with running(agent) as task:
            agent.request_drain("ASG target lifecycle state Terminated")
            assert await asyncio.wait_for(task, 10) == 0
    finally:
        await imds.cleanup()
    stub.assert_no_pending_responses()
    assert agent.hub._http is not None and agent.hub._http.closed
    assert agent.imds._session is not None and agent.imds._session.closed


async def fake_imds(meta: dict[str, str], port: int) -> web.AppRunner:
    """IMDSv2 on ``port`` answering from ``meta`` (path → text) as the test changes it."""

    async def token(_: web.Request) -> web.Response:
        return web.Response(text="t")

    async def get(request: web.Request) -> web.Response:
        value = meta.get(request.match_info["path"])
        return web.Response(text=value) if value else web.Response(status=404)

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/{path:.+}", get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_a_spot_notice_during_a_drain_shortens_it(make_running_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ASG scale-in (or a SIGTERM) began a long drain; then AWS reclaims the spot instance. Guards against the
    watch ending with the first drain: the notice went unseen and sessions ran until the instance was gone."""
    monkeypatch.setattr(worker.agent, "WATCH_INTERVAL_S", 0.1)
    port = free_port()
    meta = {"instance-id": "i-0spot", "placement/region": "us-east-1", "local-ipv4": "127.0.0.1"}
    imds = await fake_imds(meta, port)
    try:
        hub = await make_running_hub()
        settings = worker_settings(hub, worker_id=None, imds_url=f"http://127.0.0.1:{port}", drain_timeout_s=60)
        agent = WorkerAgent(settings, install_signals=False)
        async with running(agent) as task:
            async with hub.client() as client:
                await place_session(client)
            meta["autoscaling/target-lifecycle-state"] = "Terminated"
            await wait_for(lambda: agent.drain_reason is not None, 5, "the scale-in drain")
            await asyncio.sleep(0.3)
            assert not task.done() and agent.manager.sessions, "the drain waits for the session"
            deadline = datetime.now(UTC) + timedelta(seconds=worker.agent.SPOT_MARGIN_S + 2)
            meta["spot/instance-action"] = json.dumps({"action": "terminate",
                                                       "time": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")})
            assert await asyncio.wait_for(task, 6) == 0, "the drain ends before the instance does"
            assert agent.drain_reason.startswith("ASG") and agent.manager.sessions == {}
    finally:
        await imds.cleanup()
