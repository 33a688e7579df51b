"""Scale-in protection against the Auto Scaling API, faked by a botocore Stubber: it follows the sessions from the
first moment, and a failed call is retried with jittered backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

import worker.lifecycle as lifecycle_module
from shared.backoff import backoff_delays
from tests.conftest import wait_for
from worker.lifecycle import Lifecycle

PROTECTION = {"InstanceIds": ["i-1"], "AutoScalingGroupName": "asg-gpu"}


def stubbed_autoscaling() -> tuple[Any, Stubber]:
    client = boto3.client("autoscaling", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client, Stubber(client)


def expect_protection(stub: Stubber, protected: bool) -> None:
    stub.add_response("set_instance_protection", {}, {**PROTECTION, "ProtectedFromScaleIn": protected})


def refuse_protection(stub: Stubber) -> None:
    stub.add_client_error("set_instance_protection", "Throttling", "Rate exceeded")


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_protection_a_crashed_worker_left_on_is_lifted_while_idle() -> None:
    """Regression: a new worker without sessions never called the API, so a predecessor that died protected left
    the instance protected from scale-in for good (an idle instance the group could never remove)."""
    client, stub = stubbed_autoscaling()
    expect_protection(stub, False)
    stub.activate()
    lifecycle = Lifecycle(client, "i-1", "asg-gpu", "drain-hook")
    loop = asyncio.create_task(lifecycle.protection_loop())
    try:
        await wait_for(lambda: lifecycle.protected is False, 2, "protection lifted at the start")
        stub.assert_no_pending_responses()
    finally:
        await stop(loop)


async def test_a_failed_protection_call_is_retried_with_jittered_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a fixed 5 s: every worker of a throttled group would retry in lockstep. A success starts the backoff over."""
    drawn: list[tuple[int, int]] = []  # (which backoff, which of its delays)
    started = 0

    def quick_backoff(**_: Any) -> Iterator[float]:
        nonlocal started
        started, which = started + 1, started
        for attempt, delay in enumerate(backoff_delays(base_s=0.02, cap_s=0.1)):
            drawn.append((which, attempt))
            yield delay

    monkeypatch.setattr(lifecycle_module, "backoff_delays", quick_backoff, raising=False)
    client, stub = stubbed_autoscaling()
    refuse_protection(stub)
    refuse_protection(stub)
    expect_protection(stub, True)
    refuse_protection(stub)
    expect_protection(stub, False)
    stub.activate()
    lifecycle = Lifecycle(client, "i-1", "asg-gpu", None)
    lifecycle.sessions_changed(1)
    loop = asyncio.create_task(lifecycle.protection_loop())
    try:
        await wait_for(lambda: lifecycle.protected is True, 2, "protection on after two refusals")
        assert drawn == [(0, 0), (0, 1)]
        lifecycle.sessions_changed(0)
        await wait_for(lambda: lifecycle.protected is False, 2, "protection off after one refusal")
        assert drawn[2:] == [(1, 0)], "after a success the backoff starts over"
        stub.assert_no_pending_responses()
    finally:
        await stop(loop)


async def test_without_a_group_name_the_loop_ends_without_calling() -> None:
    client, stub = stubbed_autoscaling()
    stub.activate()  # no response queued: any call would fail the test
    await asyncio.wait_for(Lifecycle(client, "i-1", None, None).protection_loop(), 2)


async def test_session_changes_that_leave_protection_as_it_is_make_no_call(caplog: pytest.LogCaptureFixture) -> None:
    """Protection is wanted while any session runs: a second session, or the end of one of two, changes nothing.
    Guards against an Auto Scaling call at every start and stop: a busy worker used up the API's rate limit, and the
    calls that mattered (protection off when idle, the lifecycle action) were throttled."""
    client, stub = stubbed_autoscaling()
    expect_protection(stub, True)
    stub.activate()  # nothing more queued: a further call fails, and the failure is logged
    lifecycle = Lifecycle(client, "i-1", "asg-gpu", None)
    lifecycle.sessions_changed(1)
    loop = asyncio.create_task(lifecycle.protection_loop())
    try:
        await wait_for(lambda: lifecycle.protected is True, 2, "protection on")
        for count in (2, 3, 2, 1):
            lifecycle.sessions_changed(count)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        stub.assert_no_pending_responses()
        assert "set_instance_protection" not in caplog.text, caplog.text
        assert lifecycle.protected is True
    finally:
        await stop(loop)
