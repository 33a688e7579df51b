"""The worker's drain when something beside it fails: a GPU probe or a hub that never answers, an engine that cannot
close, a spot notice that comes after the drain began. The real agent against a real hub and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

import worker.agent
import worker.gpus
from shared.models import SessionDispatch
from shared.redis_server import free_port
from tests.conftest import wait_for
from tests.fakes import StaticImds
from tests.test_worker_hub import place_session, spot_notice, stubbed_autoscaling, worker_settings, worker_view
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
            await wait_for(lambda: ok._value.get() >= start + 5, 20, "heartbeats while the probe hangs")
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
    closes = 0

    async def aclose(self) -> None:
        self.closes += 1
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
    assert isinstance(agent.engine, ClosingFails) and agent.engine.closes == 1, "the engine was never closed"
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


@contextlib.asynccontextmanager
async def on_ec2(make_running_hub: Any, monkeypatch: pytest.MonkeyPatch, meta: dict[str, str],
                 **settings: Any) -> AsyncIterator[tuple[Any, WorkerAgent]]:
    """A hub, and an agent (not yet running) on an instance whose metadata is ``meta``, which the test changes as
    AWS would; the agent looks at it every 0.1 s."""
    monkeypatch.setattr(worker.agent, "WATCH_INTERVAL_S", 0.1)
    port = free_port()
    imds = await fake_imds(meta, port)
    try:
        hub = await make_running_hub()
        agent = WorkerAgent(worker_settings(hub, worker_id=None, imds_url=f"http://127.0.0.1:{port}", **settings),
                            install_signals=False)
        yield hub, agent
    finally:
        await imds.cleanup()


#: A spot instance's metadata, before AWS says anything about its end.
SPOT_INSTANCE = {"instance-id": "i-0spot", "placement/region": "us-east-1", "local-ipv4": "127.0.0.1"}


async def test_a_spot_notice_during_a_drain_shortens_it(make_running_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ASG scale-in (or a SIGTERM) began a long drain; then AWS reclaims the spot instance. Guards against the
    watch ending with the first drain: the notice went unseen and sessions ran until the instance was gone."""
    meta = dict(SPOT_INSTANCE)
    async with on_ec2(make_running_hub, monkeypatch, meta, drain_timeout_s=60) as (hub, agent), \
            running(agent) as task:
        async with hub.client() as client:
            await place_session(client)
        meta["autoscaling/target-lifecycle-state"] = "Terminated"
        await wait_for(lambda: agent.drain_reason is not None, 5, "the scale-in drain")
        await asyncio.sleep(0.3)
        assert not task.done() and agent.manager.sessions, "the drain waits for the session"
        ends = datetime.now(UTC) + timedelta(seconds=worker.agent.SPOT_MARGIN_S + 2)
        meta["spot/instance-action"] = spot_notice(ends)
        assert await asyncio.wait_for(task, 6) == 0, "the drain ends before the instance does"
        assert agent.drain_reason.startswith("ASG") and agent.manager.sessions == {}


async def test_the_hub_learns_of_a_drain_at_once_not_at_the_next_heartbeat(make_running_hub: Any) -> None:
    """A scale-in (or a SIGTERM) begins a drain while a session runs: the drain's own heartbeat tells the hub at once,
    so it stops placing sessions here. Guards against leaving it to the next regular heartbeat: for up to a whole
    interval (3 s by default) the hub kept routing new sessions to a worker that refuses them."""
    hub = await make_running_hub(heartbeat_interval_s=30.0, worker_ttl_s=90.0, pending_lease_s=120.0,
                                 active_lease_s=180.0)
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=60), install_signals=False)
    async with running(agent) as task, hub.client() as client:
        await place_session(client)
        agent.request_drain("ASG target lifecycle state Terminated")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0  # a third of the interval: no regular heartbeat comes meanwhile
        while (await worker_view(client))["state"] != "draining":
            assert loop.time() < deadline, "the hub learned of the drain only at the next heartbeat"
            await asyncio.sleep(0.05)
        assert not task.done() and agent.manager.sessions, "the drain still waits for the session"


async def test_an_instance_waiting_in_a_warm_pool_does_not_drain(make_running_hub: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance kept running in the ASG's warm pool has the target lifecycle state Warmed:Running until the group
    puts it in service. Guards against reading every state but InService as a scale-in: the worker drained and
    exited at each start (systemd restarting it), on an instance the group was about to use."""
    meta = {"instance-id": "i-0warm", "placement/region": "us-east-1", "local-ipv4": "127.0.0.1",
            "autoscaling/target-lifecycle-state": "Warmed:Running"}
    async with on_ec2(make_running_hub, monkeypatch, meta) as (_, agent), running(agent) as task:
        await asyncio.sleep(0.5)  # several looks at the target state
        assert agent.drain_reason is None and not task.done()
        meta["autoscaling/target-lifecycle-state"] = "InService"
        await asyncio.sleep(0.3)
        assert agent.drain_reason is None
        meta["autoscaling/target-lifecycle-state"] = "Terminated"  # and the watch does look
        await wait_for(lambda: agent.drain_reason is not None, 5, "the scale-in drain")
        assert await asyncio.wait_for(task, 5) == 0


async def test_a_drain_waits_for_its_sessions_without_spinning(make_running_hub: Any) -> None:
    """The drain waits (up to drain_timeout_s, minutes in production) for sessions to end, and looks again only
    when something changes: a spot notice, a second signal. Guards against a wait that woke at once, over and over:
    the drain took a CPU core from the very sessions it waited for."""
    hub = await make_running_hub()
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=60), install_signals=False)
    async with running(agent) as task:
        async with hub.client() as client:
            await place_session(client)
        waits = 0
        wait_empty = agent.manager.wait_empty

        async def counted(timeout_s: float) -> bool:
            nonlocal waits
            waits += 1
            return await wait_empty(timeout_s)

        agent.manager.wait_empty = counted  # type: ignore[method-assign]
        agent.request_drain("ASG target lifecycle state Terminated")
        await asyncio.sleep(1.0)
        assert not task.done() and agent.manager.sessions, "the drain waits for the session"
        assert waits <= 2, f"the drain looked {waits} times in 1 s with nothing changed"


class SlowToStartEngine(SyntheticEngine):
    """Takes a while to start each session, as an engine that loads a voice or warms a model does."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = asyncio.Event()

    async def start_session(self, spec: SessionDispatch, on_end: Any) -> None:
        self.starting.set()
        await asyncio.sleep(0.6)
        await super().start_session(spec, on_end)


async def test_a_session_the_engine_is_starting_when_the_drain_begins_is_waited_for(make_running_hub: Any) -> None:
    """A SIGTERM comes while the engine starts a session the hub dispatched. Guards against a drain that looked only
    at the sessions already started: it found none, deregistered and closed the engine, and the dispatch was then
    answered 201 for a session the engine's close killed without a stop. Found by a mutation review."""
    hub = await make_running_hub(dispatch_timeout_s=3.0)
    engine = SlowToStartEngine()
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=30), engine=engine, install_signals=False)
    async with running(agent) as task, hub.client() as client:
        placing = asyncio.create_task(place_session(client))
        await asyncio.wait_for(engine.starting.wait(), 10)  # the engine is starting it
        agent.request_drain("SIGTERM")
        session_id = await asyncio.wait_for(placing, 5)
        await asyncio.sleep(0.5)
        assert not task.done(), "the drain ended without waiting for the session"
        assert agent.manager is not None and agent.manager.ids() == [session_id]
        assert (await client.delete(f"/api/v1/sessions/{session_id}")).status_code == 204
        assert await asyncio.wait_for(task, 5) == 0, "the drain ends once the session has"


async def test_a_spot_notice_with_time_to_spare_lets_the_sessions_run_until_the_margin(
        make_running_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spot notice during a drain says when the instance ends: the sessions may run until SPOT_MARGIN_S before
    then. Guards against a notice that stopped the sessions at once (read as a second signal, or its time read
    backwards), losing conversations with more than a minute left, and against a drain that ran up to the
    instance's end, with no time left to stop the rest and deregister."""
    meta = dict(SPOT_INSTANCE)
    async with on_ec2(make_running_hub, monkeypatch, meta, drain_timeout_s=300) as (hub, agent), \
            running(agent) as task, hub.client() as client:
        session_id = await place_session(client)
        agent.request_drain("SIGTERM")
        meta["spot/instance-action"] = spot_notice(datetime.now(UTC) + timedelta(seconds=105))  # near AWS's two minutes
        await wait_for(lambda: agent._drain_deadline is not None, 5, "the spot notice")
        left = agent._drain_deadline - time.monotonic()
        assert 60 < left <= 95, f"the sessions were left {left:.0f} s of the instance's last 105"
        await asyncio.sleep(1.0)
        assert not task.done() and agent.manager.ids() == [session_id], "the notice stopped the session early"
        assert (await client.delete(f"/api/v1/sessions/{session_id}")).status_code == 204
        assert await asyncio.wait_for(task, 5) == 0, "the drain ends once the session has"


async def test_a_second_ctrl_c_stops_the_sessions_instead_of_waiting(make_running_hub: Any) -> None:
    """A worker run by hand drains on Ctrl-C (SIGINT) as on SIGTERM; a second Ctrl-C, like a second SIGTERM, stops
    what still runs at once rather than wait up to drain_timeout_s for it."""
    hub = await make_running_hub()
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=60), install_signals=False)
    async with running(agent) as task, hub.client() as client:
        await place_session(client)
        agent.request_drain("SIGINT")
        await wait_for(lambda: agent.manager.draining, 5, "the drain")
        assert not task.done() and agent.manager.sessions, "the first Ctrl-C waits for the session"
        agent.request_drain("SIGINT")
        assert await asyncio.wait_for(task, 5) == 0
        assert agent.manager.sessions == {}


async def test_a_lifecycle_hook_alone_has_the_drain_complete_the_lifecycle_action(
        make_running_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On EC2 with FLEET_LIFECYCLE_HOOK_NAME set and scale-in protection off, the agent builds its own ASG client
    and completes the action once drained. Guards against building it only when protection is on as well: the
    ASG waited out the hook's timeout (an hour by default) for every instance it scaled in."""
    client, stub = stubbed_autoscaling()
    stub.add_response("complete_lifecycle_action", {}, {
        "LifecycleHookName": "drain-hook", "AutoScalingGroupName": "asg-gpu", "LifecycleActionResult": "CONTINUE",
        "InstanceId": "i-1"})
    stub.activate()
    built: list[str | None] = []

    def from_settings(settings: Any, identity: Any, group: str | None) -> Lifecycle:
        built.append(group)
        return Lifecycle(client, identity.instance_id, "asg-gpu", settings.lifecycle_hook_name)

    monkeypatch.setattr(Lifecycle, "from_settings", from_settings)
    hub = await make_running_hub()
    settings = worker_settings(hub, lifecycle_hook_name="drain-hook")
    agent = WorkerAgent(settings, imds=StaticImds("i-1"), install_signals=False)
    async with running(agent) as task:
        agent.request_drain("ASG target lifecycle state Terminated")
        assert await asyncio.wait_for(task, 10) == 0
    assert len(built) == 1
    stub.assert_no_pending_responses()


async def test_a_drain_heartbeat_that_never_ends_lets_the_drain_end_with_its_last_session(
        make_running_hub: Any) -> None:
    """A hub that takes the drain's heartbeat and never answers holds the drain for hub_timeout_s at most: after it,
    the drain ends as soon as the last session does. Guards against waiting on that heartbeat with no bound: the
    worker stayed up with nothing to run until systemd killed it, and the lifecycle hook was never completed."""
    hub = await make_running_hub()
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=60, hub_timeout_s=0.5), install_signals=False)
    async with running(agent) as task, hub.client() as client:
        session_id = await place_session(client)
        never = asyncio.Event()

        async def unanswered() -> None:
            await never.wait()

        agent.hub.heartbeat_once = unanswered  # type: ignore[method-assign]
        agent.request_drain("ASG target lifecycle state Terminated")
        assert (await client.delete(f"/api/v1/sessions/{session_id}")).status_code == 204
        assert await asyncio.wait_for(task, 5) == 0, "the drain ends once the session has"


class StartFails(SyntheticEngine):
    async def start(self) -> None:
        raise RuntimeError("CUDA error: out of memory")


async def test_a_worker_that_could_not_start_leaves_the_lifecycle_hook_alone(make_running_hub: Any) -> None:
    """The hook is the termination's: an instance whose worker failed to start is not leaving (systemd starts the
    worker again), so there is no lifecycle action to complete. Completing one anyway only earned an error from AWS
    on every failed start."""
    completed: list[str] = []

    class Spied(Lifecycle):
        def complete(self, result: str = "CONTINUE") -> bool:
            completed.append(result)
            return True

    hub = await make_running_hub()
    port = free_port()
    imds = await fake_imds({"instance-id": "i-1", "local-ipv4": "127.0.0.1"}, port)
    client, _ = stubbed_autoscaling()
    try:
        settings = worker_settings(hub, lifecycle_hook_name="drain-hook", imds_url=f"http://127.0.0.1:{port}")
        agent = WorkerAgent(settings, engine=StartFails(), lifecycle=Spied(client, "i-1", "asg-gpu", "drain-hook"),
                            install_signals=False)
        with pytest.raises(RuntimeError, match="out of memory"):
            await asyncio.wait_for(agent.run(), 10)
    finally:
        await imds.cleanup()
    assert completed == []
    assert agent.imds._session is None or agent.imds._session.closed  # what it opened was still closed


@pytest.mark.parametrize(("drain_timeout_s", "second_signal", "said"), [
    (60, True, "drain cut short by a second signal: stopping 1 sessions"),
    (0.5, False, "drain timeout after 0.5 s: stopping 1 sessions"),
], ids=["second-signal", "timeout"])
async def test_the_log_says_why_the_drain_stopped_the_sessions_that_still_ran(
        make_running_hub: Any, caplog: pytest.LogCaptureFixture, drain_timeout_s: float, second_signal: bool,
        said: str) -> None:
    """Regression: a second SIGTERM during a drain logged ``drain timeout: stopping 1 sessions``, and an operator
    reading it believed the sessions had been given their time."""
    hub = await make_running_hub()
    agent = WorkerAgent(worker_settings(hub, drain_timeout_s=drain_timeout_s), install_signals=False)
    async with running(agent) as task, hub.client() as client:
        await place_session(client)
        agent.request_drain("SIGTERM")
        await wait_for(lambda: agent.manager.draining, 5, "the drain")
        if second_signal:
            agent.request_drain("SIGTERM")
        assert await asyncio.wait_for(task, 10) == 0
    stopping = [r.getMessage() for r in caplog.records if "stopping 1 sessions" in r.getMessage()]
    assert stopping == [said], caplog.text


@pytest.mark.parametrize(("drain_timeout_s", "notice_in_s", "said"), [
    (60, worker.agent.SPOT_MARGIN_S + 2, "spot interruption deadline reached: stopping 1 sessions"),
    (4, worker.agent.SPOT_MARGIN_S + 90, "drain timeout after 4 s: stopping 1 sessions"),
], ids=["deadline-first", "timeout-first"])
async def test_a_drain_with_a_spot_notice_ends_at_whichever_comes_first_and_says_which(
        make_running_hub: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        drain_timeout_s: float, notice_in_s: float, said: str) -> None:
    """A spot notice whose deadline is later than ``drain_timeout_s`` does not stretch the drain past it; one that
    is sooner ends it, and the log names the notice, not a timeout the operator did not configure."""
    meta = dict(SPOT_INSTANCE)
    async with on_ec2(make_running_hub, monkeypatch, meta, drain_timeout_s=drain_timeout_s) as (hub, agent), \
            running(agent) as task:
        async with hub.client() as client:
            await place_session(client)
        agent.request_drain("SIGTERM")
        await wait_for(lambda: agent.manager.draining, 5, "the drain")
        meta["spot/instance-action"] = spot_notice(datetime.now(UTC) + timedelta(seconds=notice_in_s))
        await wait_for(lambda: agent._drain_deadline is not None, 3, "the spot notice")
        assert await asyncio.wait_for(task, 20) == 0
    stopping = [r.getMessage() for r in caplog.records if "stopping 1 sessions" in r.getMessage()]
    assert stopping == [said], caplog.text
