"""Fire-and-forget work that must still be tracked: kept referenced, logged on failure, cancelled on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from shared.errors import StoreUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """The task, for a caller that waits a while for it; it runs on (and is logged) however that wait ends."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("background task %s failed: %s", task.get_name(), describe(exc), exc_info=_traceback(exc))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_every(interval_s: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """A background loop that survives its step's failures and always yields between steps.

    It also stops when a cancellation was requested but swallowed inside a step (some client libraries catch
    CancelledError while cleaning up a connection), so shutdown can never hang on it. A CancelledError that no one
    asked of the loop (a step awaited a future some other code cancelled) is a failed step like any other: the
    board must not stop refreshing, silently, for the rest of the hub's life.
    """
    me = asyncio.current_task()
    while True:
        try:
            await step()
        except asyncio.CancelledError as exc:
            if me is None or me.cancelling():
                raise
            log.warning("%s failed: %s", name, describe(exc), exc_info=exc)
        except Exception as exc:  # a loop must outlive one bad step; the error is logged
            log.warning("%s failed: %s", name, describe(exc), exc_info=_traceback(exc))
        if me is not None and me.cancelling():
            raise asyncio.CancelledError
        await asyncio.sleep(interval_s)


def describe(exc: BaseException) -> str:
    """``KeyError: 'url'`` rather than a bare ``'url'``."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _traceback(exc: BaseException) -> BaseException | None:
    """A bug's traceback goes to the log; an outage of the store is expected and says enough in one line."""
    return None if isinstance(exc, StoreUnavailable) else exc
