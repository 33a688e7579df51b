"""Background work logs a bug with its traceback, an outage of the store in one line, and always cleans up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hub.tasks import BackgroundTasks, run_every
from shared.errors import StoreUnavailable


async def test_a_loop_step_that_fails_logs_its_traceback_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """The refresh loop logged a bug as ``routing board refresh failed: 'url'``: no type, no line to look at."""
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("url")
        if calls == 2:
            raise StoreUnavailable("the shared store is unreachable")

    with caplog.at_level(logging.WARNING, logger="hub.tasks"):
        loop = asyncio.create_task(run_every(0.001, step, "routing board refresh"))
        while calls < 3:
            await asyncio.sleep(0.005)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    bug, outage = (r for r in caplog.records if "failed" in r.getMessage())
    assert bug.getMessage() == "routing board refresh failed: KeyError: 'url'" and bug.exc_info is not None
    assert "StoreUnavailable: the shared store is unreachable" in outage.getMessage() and not outage.exc_info


async def test_a_spawned_task_that_fails_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ValueError("bad figure")

    tasks = BackgroundTasks()
    with caplog.at_level(logging.WARNING, logger="hub.tasks"):
        tasks.spawn(fails(), "tell the worker to stop")
        await asyncio.sleep(0.01)
        await tasks.aclose()
    (record,) = caplog.records
    assert record.getMessage() == "background task tell the worker to stop failed: ValueError: bad figure"
    assert record.exc_info is not None and record.exc_info[0] is ValueError
