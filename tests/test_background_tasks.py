"""Background work logs a bug with its traceback, an outage of the store in one line, and always cleans up."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Callable

import pytest

from hub.tasks import BackgroundTasks, run_every
from shared.aio import cancel_and_wait
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


async def test_a_loop_whose_step_swallows_its_cancellation_still_stops() -> None:
    """Some client libraries catch CancelledError while closing a connection; shutdown must not hang on the loop."""
    entered = asyncio.Event()
    swallow = True

    async def step() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if not swallow:
                raise

    loop = asyncio.create_task(run_every(0.001, step, "routing board refresh"))
    try:
        await entered.wait()
        loop.cancel()
        await asyncio.wait({loop}, timeout=10)  # it stops at once; the bound only keeps a broken loop from hanging
        assert loop.cancelled(), "the loop went on after its cancellation"
    finally:
        swallow = False
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_step_that_meets_a_cancellation_no_one_asked_of_the_loop_fails_like_any_other_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A step that awaits a future other code cancelled gets a CancelledError; the loop was not cancelled, so it
    logs the step and goes on (before, the board stopped refreshing for the rest of the hub's life, unlogged)."""
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            shared_read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            shared_read.cancel()  # as another task does when it gives up on a read both were waiting for
            await shared_read

    with caplog.at_level(logging.WARNING, logger="hub.tasks"):
        loop = asyncio.create_task(run_every(0.001, step, "routing board refresh"))
        try:
            async with asyncio.timeout(10):
                await _until(lambda: calls >= 3 or loop.done())
            assert not loop.done(), "the loop ended on a cancellation aimed at something else"
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    assert loop.cancelled()
    (record,) = (r for r in caplog.records if "failed" in r.getMessage())
    assert record.getMessage() == "routing board refresh failed: CancelledError"


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0.001)


async def test_a_loop_waits_its_interval_between_steps() -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1

    loop = asyncio.create_task(run_every(3600, step, "fleet gauges"))
    try:
        for _ in range(50):  # plenty of chances to run a step that did not wait
            await asyncio.sleep(0)
        assert calls == 1
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_closing_cancels_the_tasks_still_running_and_waits_for_their_clean_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On shutdown a task still running is cancelled, its clean-up has run when ``aclose`` returns, and a
    cancellation is not logged as a failure."""
    started = asyncio.Event()
    cleaned_up: list[str] = []

    async def long_running() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # a clean-up that awaits, as closing a connection does
            cleaned_up.append("done")

    tasks = BackgroundTasks()
    with caplog.at_level(logging.WARNING):
        task = tasks.spawn(long_running(), "stop a session on its worker")
        await started.wait()
        async with asyncio.timeout(10):  # returns at once; the bound only keeps an uncancelled task from hanging
            await tasks.aclose()
        assert task.cancelled() and cleaned_up == ["done"]
        await asyncio.sleep(0)  # done callbacks have run
    assert not caplog.records, [r.getMessage() for r in caplog.records]


async def test_a_finished_task_is_not_kept() -> None:
    """The hub spawns tasks per request: one kept after it finished would be a leak that grows with traffic."""
    async def quick() -> int:
        return 1

    tasks = BackgroundTasks()
    task = tasks.spawn(quick(), "tell the worker to stop")
    assert await task == 1
    await asyncio.sleep(0)  # its done callback has run
    finished = weakref.ref(task)
    del task
    gc.collect()
    assert finished() is None, "a finished task is still referenced"


async def test_cancelling_no_task_at_all_returns_at_once() -> None:
    """A transport or hub that stops before it started a loop cancels an empty set of tasks: that is no error."""
    await asyncio.wait_for(cancel_and_wait(), 5)


async def test_a_task_whose_clean_up_fails_when_cancelled_is_not_reported_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """Its failure is the owner's to log where it happens; asyncio must not add "Task exception was never
    retrieved" to the logs of every stop."""
    async def clean_up_fails() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("clean-up failed")

    task = asyncio.create_task(clean_up_fails())
    await asyncio.sleep(0)  # it is running
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await cancel_and_wait(task)
        assert task.done() and not task.cancelled()  # it ended with its own failure
        del task
        gc.collect()
    assert "never retrieved" not in caplog.text
