"""Each hub's in-memory mirror of the routing board, and request-time ranking over it.

The mirror is refreshed in the background (``snapshot_refresh_s``), never on the request path, except once when
a request finds no candidate at all. Workers that share a location and label set form a group whose members are
ranked once per refresh by everything but distance; a request scores groups by distance and looks only at the
top of each, so its cost depends on the number of groups (regions x label sets), not on the number of workers.
Staleness is safe: the reservation script re-checks liveness, state and capacity atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from hub.scoring import Factors, Weights, factors, load_factors, partial_score, score
from hub.store import FleetStore
from shared.geo import haversine_km
from shared.models import Policy

log = logging.getLogger(__name__)

#: Members looked at per group per request.
_TOP_PER_GROUP = 8
#: Workers kept in the ranked answer (the allocator tries at most ``max_dispatch_attempts`` of them).
_RANKED_MAX = 8


@dataclass(slots=True)
class Entry:
    """One worker as this hub last saw it."""

    worker_id: str
    url: str
    region: str
    zone: str | None
    lat: float
    lon: float
    labels: dict[str, str]
    max_streams: int
    static: dict[str, Any]
    used: int = 0
    state: str = "ready"
    heartbeat_ms: int = 0
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return float(self.status.get("latency_ms", 0.0))

    @property
    def gpu_utilization(self) -> float:
        return float(self.status.get("gpu_utilization", 0.0))


@dataclass(slots=True)
class Group:
    lat: float
    lon: float
    labels: dict[str, str]
    members: list[Entry]  # eligible at refresh time, best partial score first


@dataclass(frozen=True, slots=True)
class Ranked:
    entry: Entry
    score: float
    factors: Factors


class RoutingBoard:
    def __init__(self, store: FleetStore, *, ttl_ms: int, retention_ms: int, policy: Policy, weights: Weights,
                 near_best_margin: float, rng: random.Random | None = None) -> None:
        self.store = store
        self.ttl_ms = ttl_ms
        self.retention_ms = retention_ms
        self.policy = policy
        self.weights = weights
        self.near_best_margin = near_best_margin
        self.rng = rng or random.Random()
        self.entries: dict[str, Entry] = {}
        self.groups: list[Group] = []
        self.now_ms = 0  # Redis clock at the last refresh
        self._mono_at_refresh = 0.0
        self._generation: int | None = None
        self._static: dict[str, dict[str, Any]] = {}
        self._status_cache: dict[str, tuple[str | None, dict[str, Any]]] = {}
        self._group_of: dict[str, Group] = {}
        self._groups_by_key: dict[tuple[float, float, tuple[tuple[str, str], ...]], Group] = {}
        self._lock = asyncio.Lock()

    # --- refresh ------------------------------------------------------------------------------------------

    @property
    def age_s(self) -> float:
        return time.monotonic() - self._mono_at_refresh if self._mono_at_refresh else float("inf")

    def redis_now_ms(self) -> int:
        """The Redis clock, extrapolated from the last refresh with the local monotonic clock."""
        return self.now_ms + int((time.monotonic() - self._mono_at_refresh) * 1000)

    async def refresh(self, *, if_older_than_s: float = 0.0) -> None:
        async with self._lock:
            if self.age_s < if_older_than_s:
                return  # another request refreshed while we waited
            read = await self.store.read_board(self._generation)
            if read.static is not None:
                self._generation = read.generation
                self._static = {wid: json.loads(raw) for wid, raw in read.static.items()}
            self._rebuild(read.status, read.used, read.now_ms)
            forgotten = [e.worker_id for e in self.entries.values()
                         if e.heartbeat_ms and read.now_ms - e.heartbeat_ms > self.retention_ms]
            if forgotten:
                await self.store.forget_on_board(forgotten)

    def _rebuild(self, status: dict[str, str], used: dict[str, str], now_ms: int) -> None:
        # Incremental: a worker whose static view and status string did not change since the last refresh keeps
        # its Entry (its mutable fields are reset from this read); only changed statuses are parsed. At 10,000
        # workers a full rebuild blocked the event loop for tens of ms every refresh (the p99 of allocations).
        entries: dict[str, Entry] = {}
        old = self.entries
        cache = self._status_cache
        new_cache: dict[str, tuple[str | None, dict[str, Any]]] = {}
        for wid, st in self._static.items():
            raw = status.get(wid)
            hit = cache.get(wid)
            stat = hit[1] if hit is not None and hit[0] == raw else (json.loads(raw) if raw is not None else {})
            new_cache[wid] = (raw, stat)
            e = old.get(wid)
            if e is not None and e.static is st and e.status is stat:
                e.used = int(used.get(wid, 0))
                e.max_streams = int(st["max_streams"])
                e.state = stat.get("state", "ready")
                e.heartbeat_ms = int(stat.get("hb", 0))
            else:
                e = Entry(
                    worker_id=wid, url=st["url"], region=st["region"], zone=st.get("zone"), lat=float(st["lat"]),
                    lon=float(st["lon"]), labels=st.get("labels") or {}, max_streams=int(st["max_streams"]),
                    static=st, used=int(used.get(wid, 0)), state=stat.get("state", "ready"),
                    heartbeat_ms=int(stat.get("hb", 0)), status=stat,
                )
            entries[wid] = e
        self._status_cache = new_cache
        self.entries = entries
        self.now_ms = now_ms
        self._mono_at_refresh = time.monotonic()
        self._regroup()

    def _regroup(self) -> None:
        self._groups_by_key = {}
        self._group_of = {}
        for e in self.entries.values():
            if self._eligible(e, self.now_ms):
                self._group_for(e).members.append(e)
                self._group_of[e.worker_id] = self._group_for(e)
        for group in self._groups_by_key.values():
            group.members.sort(key=self._partial, reverse=True)
        self.groups = list(self._groups_by_key.values())

    def _group_for(self, e: Entry) -> Group:
        key = (e.lat, e.lon, tuple(sorted(e.labels.items())))
        group = self._groups_by_key.get(key)
        if group is None:
            group = self._groups_by_key[key] = Group(lat=e.lat, lon=e.lon, labels=e.labels, members=[])
            self.groups = [*self.groups, group]
        return group

    def _partial(self, e: Entry) -> float:
        load, latency, capacity = load_factors(e.used, e.max_streams, e.gpu_utilization, e.latency_ms, self.policy)
        return partial_score(load, latency, capacity, self.weights)

    def _eligible(self, e: Entry, now_ms: int) -> bool:
        return e.state == "ready" and now_ms - e.heartbeat_ms < self.ttl_ms and e.used < e.max_streams

    # --- what this hub learns between refreshes ----------------------------------------------------------

    def note_used(self, worker_id: str, used: int, max_streams: int | None = None) -> None:
        e = self.entries.get(worker_id)
        if e is None:
            return
        e.used = used
        if max_streams is not None:
            e.max_streams = max_streams
        if e.used >= e.max_streams:
            self._leave_group(e)
        elif e.worker_id not in self._group_of and self._eligible(e, self.redis_now_ms()):
            group = self._group_for(e)  # a slot came back: rejoin, in score order
            group.members.append(e)
            group.members.sort(key=self._partial, reverse=True)
            self._group_of[e.worker_id] = group

    def note_unavailable(self, worker_id: str) -> None:
        """Skip this worker until the next refresh (it refused, timed out, or the script said it is not ready)."""
        e = self.entries.get(worker_id)
        if e is not None:
            e.state = "unavailable"
            self._leave_group(e)

    def _leave_group(self, e: Entry) -> None:
        group = self._group_of.pop(e.worker_id, None)
        if group is not None:
            group.members.remove(e)

    # --- ranking ------------------------------------------------------------------------------------------

    def rank(self, lat: float, lon: float, labels: dict[str, str] | None = None, *, policy: Policy | None = None,
             limit: int = _RANKED_MAX, explain: bool = False) -> list[Ranked]:
        """Best candidates first; the head is randomised among the near-best so many hubs do not herd."""
        policy = policy or self.policy
        now = self.redis_now_ms()
        want = labels or {}
        scored: list[Ranked] = []
        candidates: list[tuple[Group, float]] = []
        nearest_km = float("inf")
        for group in self.groups:
            if want and any(group.labels.get(k) != v for k, v in want.items()):
                continue
            km = haversine_km(lat, lon, group.lat, group.lon)
            candidates.append((group, km))
            if km < nearest_km and any(self._eligible(e, now) for e in group.members):
                nearest_km = km
        if nearest_km == float("inf"):
            nearest_km = 0.0
        for group, km in candidates:
            taken = 0
            for e in group.members:
                if taken >= (_TOP_PER_GROUP if not explain else len(group.members)):
                    break
                if not self._eligible(e, now):
                    continue
                f = factors(km, e.used, e.max_streams, e.gpu_utilization, e.latency_ms, policy, nearest_km)
                scored.append(Ranked(entry=e, score=score(f, self.weights), factors=f))
                taken += 1
        scored.sort(key=lambda r: r.score, reverse=True)
        if explain:
            return scored[:limit]
        scored = scored[:limit]
        return self._two_choices(scored)

    def _two_choices(self, ranked: list[Ranked]) -> list[Ranked]:
        """Power of two choices among the near-best: pick two at random, lead with the better."""
        if len(ranked) < 2:
            return ranked
        best = ranked[0].score
        near = [r for r in ranked[:4] if best - r.score <= self.near_best_margin]
        if len(near) < 2:
            return ranked
        a, b = self.rng.sample(near, 2)
        lead = a if a.score >= b.score else b
        return [lead] + [r for r in ranked if r is not lead]
