"""The routing simulator's hubs: hub processes behind a round-robin load balancer, each with its own mirror.

Each ``HubMirror`` is the hub's own ``hub.board.RoutingBoard``, which re-reads the simulated Redis board (a log of
``BoardChange``) every ``refresh_s`` at a phase of its own, applied as the delta reads a hub makes
(``RoutingBoard.apply``), and learns its own reservations at once through ``note_used``. A hub does not see the
other hubs' reservations until its next refresh, so its board can offer a worker that is full: the reservation
refuses it, and the request goes on through the hub's own placement loop (``hub.placement.first_to_accept``),
which here reserves in memory and reads the log instead of Redis.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from hub.board import Ranked, RoutingBoard
from hub.placement import first_to_accept
from hub.settings import HubSettings
from hub.store import BoardRead
from shared.errors import NoCapacity
from shared.models import Policy

if TYPE_CHECKING:
    from bench.routing import Worker

_T = TypeVar("_T")

#: (sim second, worker index, leases held, sessions running): what the board in Redis hears, in time order.
BoardChange = tuple[float, int, int, int]


class HubMirror:
    """One hub process's ``RoutingBoard``, refreshed from the Redis board through the board's own delta rebuild."""

    def __init__(self, fleet: list[Worker], policy: Policy, refresh_s: float, phase_s: float, seed: int) -> None:
        self.fleet = fleet
        self.refresh_s = refresh_s
        self.phase_s = phase_s
        self.read_up_to = 0  # changes already read
        hs = HubSettings()
        self.board = RoutingBoard(None, ttl_ms=10 ** 12, retention_ms=10 ** 12,  # type: ignore[arg-type]
                                  policy=policy, weights=hs.weights,
                                  near_best_margin=hs.near_best_margin, rng=random.Random(seed))
        self.board.apply(BoardRead(
            static={x.wid: json.dumps({"url": "", "region": x.region, "zone": None, "lat": x.lat, "lon": x.lon,
                                       "labels": {}, "max_streams": x.max_streams}) for x in fleet},
            status={x.wid: _status(x, 0) for x in fleet}, used={x.wid: "0" for x in fleet}, now_ms=1, complete=True))

    def last_refresh(self, now: float) -> float:
        return self.phase_s + math.floor((now - self.phase_s) / self.refresh_s) * self.refresh_s

    def refresh(self, changes: list[BoardChange], up_to: float) -> None:
        """Read what changed on the Redis board up to ``up_to``, as a delta read (``RoutingBoard.refresh``)."""
        status: dict[str, str | None] = {}
        used: dict[str, str | None] = {}
        while self.read_up_to < len(changes) and changes[self.read_up_to][0] <= up_to:
            _, i, leases, running = changes[self.read_up_to]
            x = self.fleet[i]
            status[x.wid], used[x.wid] = _status(x, running), str(leases)
            self.read_up_to += 1
        if status:
            self.board.apply(BoardRead(static={}, status=status, used=used, now_ms=int(up_to * 1000) + 1,
                                       complete=False))


def _status(x: Worker, running: int) -> str:
    """A worker's status on the board, as its heartbeat writes it (what ranking reads of it)."""
    return json.dumps({"latency_ms": x.latency_ms, "gpu_utilization": 100.0 * running / x.max_streams})


class HubsBehindLoadBalancer:
    """``hubs`` hub processes; each request goes to the next one, which places it with the hub's own loop."""

    def __init__(self, fleet: list[Worker], changes: list[BoardChange], policy: Policy, *, hubs: int,
                 refresh_s: float, phases: random.Random, seed: int) -> None:
        self.changes = changes  # the Redis board's log, which the simulator appends to
        self.hubs = [HubMirror(fleet, policy, refresh_s, phases.uniform(0, refresh_s), seed + h) for h in range(hubs)]
        self.by_wid = {x.wid: x for x in fleet}
        self.next_hub = itertools.count()
        self.refused = 0  # reservations the script refused (a hub's board was stale)
        self.forced_refreshes = 0  # board reads a request made because no candidate was left
        self.max_dispatches = HubSettings().max_dispatch_attempts

    def place(self, now: float, lat: float, lon: float) -> Worker | None:
        """The hub's own placement on the next hub; every dispatch is accepted here."""
        hub = self.hubs[next(self.next_hub) % len(self.hubs)]
        hub.refresh(self.changes, hub.last_refresh(now))

        async def reserve(candidate: Ranked) -> tuple[Worker | None, bool]:
            x = self.by_wid[candidate.entry.worker_id]
            if x.used < x.max_streams:  # the RESERVE script's check
                hub.board.note_used(x.wid, x.used + 1, x.max_streams)
                return x, True
            self.refused += 1
            hub.board.note_used(x.wid, x.used, x.max_streams)  # the script answers what it counts
            return None, False

        async def read_again(_looked: float) -> None:
            hub.refresh(self.changes, now)
            self.forced_refreshes += 1

        try:
            return _run_without_io(first_to_accept(hub.board, lat, lon, None, reserve, read_again,
                                                   max_dispatches=self.max_dispatches))
        except NoCapacity:
            return None


def _run_without_io(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never waits (the simulator reserves and reads in memory) to its end, without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the placement waited for I/O, which the simulator does not do")
