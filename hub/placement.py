"""Placing on the best candidate that accepts: rank, try, learn from a refusal, rank again.

Pure of I/O: what trying a candidate means (reserve, dispatch, confirm) and how the board is read again are the
caller's, so the routing simulator (``bench/routing_hubs.py``) runs this very loop over its in-memory fleet.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hub.board import Ranked, RoutingBoard
from shared.errors import NoCapacity, NoMatchingWorker

_T = TypeVar("_T")

#: Reservation attempts per request; each is one Lua call, refused ones cost ~0.1 ms.
MAX_RESERVATIONS = 64


async def first_to_accept(board: RoutingBoard, lat: float, lon: float, labels: dict[str, str] | None,
                          attempt: Callable[[Ranked], Awaitable[tuple[_T | None, bool]]],
                          read_again: Callable[[float], Awaitable[None]], *, max_dispatches: int) -> _T:
    """What ``attempt`` made of the first candidate it placed, best candidates first; NoCapacity when none did, or
    NoMatchingWorker when no worker at all has ``labels``.

    ``attempt(candidate)`` answers (the placement or None, whether it dispatched to the worker). A refusal teaches the
    board (the attempt notes what the reservation script or the worker said), so after a failed dispatch the rest are
    ranked again; a refused reservation costs only a Lua call and the next candidate is tried at once. When no
    untried candidate is left, ``read_again(looked)`` reads the board once more (``looked``: the ``time.monotonic()``
    the last ranking began, so concurrent requests can share a read that began after it): a worker may have
    registered, or slots returned, since the last refresh, maybe via another hub. Only then is there no capacity, so
    a stale board never rejects a request a fresh one would place (no false rejects).
    """
    tried: set[str] = set()
    dispatches = reservations = 0
    read = lifted = False
    while dispatches < max_dispatches and reservations < MAX_RESERVATIONS:
        looked = time.monotonic()
        ranked = [r for r in board.rank(lat, lon, labels) if r.entry.worker_id not in tried]
        if not ranked:
            if not read:
                await read_again(looked)
                read = True
                continue
            # Workers benched for a failed dispatch are tried last rather than not at all: a 503 with healthy
            # workers on the board is a false reject.
            if lifted or not board.lift_benches(tried):
                break
            lifted = True
            continue
        for candidate in ranked[:MAX_RESERVATIONS - reservations]:
            tried.add(candidate.entry.worker_id)
            reservations += 1
            placed, dispatched = await attempt(candidate)
            if placed is not None:
                return placed
            if dispatched:
                dispatches += 1
                break  # rank again: the board has learned from the failure
    if labels and not board.carries(labels):  # the board was read again above: it is not merely stale
        raise NoMatchingWorker(f"No live worker has the labels {describe_labels(labels)}.")
    raise NoCapacity()


def describe_labels(labels: dict[str, str]) -> str:
    """``gpu=a10g, tier=gold``: in key order, as a refusal and the explain view name them."""
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
