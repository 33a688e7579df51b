"""asyncio helpers both processes use."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until each has finished, without swallowing a cancellation of the caller.

    ``suppress(CancelledError)`` around ``await task`` would also eat the caller's own cancellation, and a cancelled
    loop would then run on for ever. A task's own failure is taken here (it was logged where it happened, if at
    all), so asyncio does not report it again as never retrieved.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()
