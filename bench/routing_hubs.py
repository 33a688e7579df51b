"""The routing simulator's hubs: hub processes behind a round-robin load balancer, each with its own mirror.

Each ``HubMirror`` is the hub's own ``hub.board.RoutingBoard``, which re-reads the simulated Redis board (a log of
``BoardChange``) every ``refresh_s`` at a phase of its own through the board's own delta rebuild, and learns its
own reservations at once through ``note_used``. A hub does not see the other hubs' reservations until its next
refresh, so its board can offer a worker that is full: the reservation refuses it, and the request continues as
``hub.allocator.Allocator._place`` does (restated in ``HubsBehindLoadBalancer.place``, since ``_place`` is async
and does I/O; the ranking is the hub's own).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import TYPE_CHECKING

from hub.allocator import _MAX_RESERVATIONS
from hub.board import RoutingBoard
from hub.settings import HubSettings
from shared.models import Policy

if TYPE_CHECKING:
    from bench.routing import Worker

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
        self.board._static = {x.wid: {"url": "", "region": x.region, "zone": None, "lat": x.lat, "lon": x.lon,
                                      "labels": {}, "max_streams": x.max_streams} for x in fleet}
        for x in fleet:
            self._mirror(x, 0, 0)
        self.board._rebuild(None, now_ms=1)

    def _mirror(self, x: Worker, used: int, running: int) -> None:
        self.board._used_raw[x.wid] = str(used)
        self.board._status_raw[x.wid] = json.dumps({"latency_ms": x.latency_ms,
                                                    "gpu_utilization": 100.0 * running / x.max_streams})

    def last_refresh(self, now: float) -> float:
        return self.phase_s + math.floor((now - self.phase_s) / self.refresh_s) * self.refresh_s

    def refresh(self, changes: list[BoardChange], up_to: float) -> None:
        """Read what changed on the Redis board up to ``up_to`` (as ``RoutingBoard.refresh`` does)."""
        changed: set[str] = set()
        while self.read_up_to < len(changes) and changes[self.read_up_to][0] <= up_to:
            _, i, used, running = changes[self.read_up_to]
            self._mirror(self.fleet[i], used, running)
            changed.add(self.fleet[i].wid)
            self.read_up_to += 1
        if changed:
            self.board._rebuild(changed, now_ms=int(up_to * 1000) + 1)


class HubsBehindLoadBalancer:
    """``hubs`` hub processes; each request goes to the next one, which places it as ``Allocator._place`` does."""

    def __init__(self, fleet: list[Worker], changes: list[BoardChange], policy: Policy, *, hubs: int,
                 refresh_s: float, phases: random.Random, seed: int) -> None:
        self.changes = changes  # the Redis board's log, which the simulator appends to
        self.hubs = [HubMirror(fleet, policy, refresh_s, phases.uniform(0, refresh_s), seed + h) for h in range(hubs)]
        self.by_wid = {x.wid: x for x in fleet}
        self.next_hub = itertools.count()
        self.refused = 0  # reservations the script refused (a hub's board was stale)
        self.forced_refreshes = 0  # board reads a request made because no candidate was left

    def place(self, now: float, lat: float, lon: float) -> Worker | None:
        """``Allocator._place`` on the next hub (every dispatch is accepted here)."""
        hub = self.hubs[next(self.next_hub) % len(self.hubs)]
        hub.refresh(self.changes, hub.last_refresh(now))
        board = hub.board
        tried: set[str] = set()
        reservations = 0
        refreshed = False
        while reservations < _MAX_RESERVATIONS:
            ranked = [r for r in board.rank(lat, lon) if r.entry.worker_id not in tried]
            if not ranked:
                if refreshed:
                    break
                hub.refresh(self.changes, now)  # no candidate left: read the board once more
                self.forced_refreshes += 1
                refreshed = True
                continue
            for candidate in ranked:
                x = self.by_wid[candidate.entry.worker_id]
                tried.add(x.wid)
                reservations += 1
                if x.used < x.max_streams:  # the RESERVE script's check
                    board.note_used(x.wid, x.used + 1, x.max_streams)
                    return x
                self.refused += 1
                board.note_used(x.wid, x.used, x.max_streams)  # the script answers what it counts
        return None
