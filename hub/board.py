"""Each hub's in-memory mirror of the routing board, and request-time ranking over it.

The mirror is refreshed in the background (``snapshot_refresh_s``). A session request reads it as it is, except
once when it finds no candidate at all; SRE reads (listings, capacity, explain) refresh it first, as they must
show the store as it is now. Workers that share a location and label set form a group whose members are
ranked once per refresh by everything but distance; a request scores groups by distance and looks only at the
top of each, so its cost depends on the number of groups (regions x label sets), not on the number of workers.
Staleness is safe: the reservation script re-checks liveness, state and capacity atomically.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import random
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from hub.capacity import alive
from hub.scoring import Factors, Weights, distance_factor, factors, load_factors, partial_score
from hub.store import BoardRead, FleetStore
from shared.geo import haversine_km
from shared.models import Policy

log = logging.getLogger(__name__)

#: Members looked at per group per request.
_TOP_PER_GROUP = 8
#: Workers kept in the ranked answer (the allocator dispatches to at most ``max_dispatch_attempts`` of them, and
#: ranks again without the ones tried when a stale board offered a full worker).
_RANKED_MAX = 8
#: Random draws among the near-best before listing the eligible ones (a member's heartbeat may lapse between
#: refreshes; the draws almost always find an eligible one at once).
_LEAD_DRAWS = 4


#: How often a hub reads the whole board rather than what changed: anything a delta read cannot learn of (an older
#: snapshot restored, a removal that was never logged) is gone from every mirror within this. At 10,000 workers a
#: whole read is a few megabytes and parses only the views that differ from the mirror's.
WHOLE_READ_EVERY_S = 60.0
#: A worker whose dispatch failed (no answer in time, unreachable, an error) is left out of this hub's ranking for
#: this long, doubled at each failure in a row up to the cap; its next dispatch that succeeds clears it. Skipping it
#: only until the next refresh (a second) had a worker whose engine hangs cost one request a dispatch timeout every
#: second on every hub, while its heartbeats kept it live. A placement that finds no other candidate still tries it
#: (``lift_benches``): a blip of the hub's own network benches every worker, and a 503 then is a false reject.
BENCH_BASE_S = 2.0
BENCH_CAP_S = 30.0


#: Workers with the same location and labels share a group: (lat, lon, sorted labels).
GroupKey = tuple[float, float, tuple[tuple[str, str], ...]]


@dataclass(slots=True, eq=False)  # identity: groups find members with list.remove
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
    static_raw: str = ""  # the JSON ``static`` was parsed from: an unchanged registration view is not parsed again
    used: int = 0
    state: str = "ready"
    heartbeat_ms: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    status_raw: str | None = None  # the JSON ``status`` was parsed from: an unchanged string is not parsed again
    #: Everything but distance, scored when used or status last changed (``None``: not scored yet).
    partial: float | None = None
    group_key: GroupKey = field(init=False)

    def __post_init__(self) -> None:
        self.group_key = (self.lat, self.lon, tuple(sorted(self.labels.items())))

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
    km: float  # user → worker
    nearest_km: float  # user → the nearest group with a worker that can take a session
    policy: Policy

    @property
    def factors(self) -> Factors:
        """What the score is made of (for an SRE's explanation; placing a session needs only the score)."""
        e = self.entry
        return factors(self.km, e.used, e.max_streams, e.gpu_utilization, e.latency_ms, self.policy, self.nearest_km)


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
        self._read_began = float("-inf")  # monotonic time the last read of the board began
        self._changes_since_ms: int | None = None  # the next refresh reads only what changed since
        self._epoch: str | None = None  # the board's dataset at the last read (``BoardRead.epoch``)
        self.whole_read_every_s = WHOLE_READ_EVERY_S
        self._whole_read_began = float("-inf")  # monotonic time the last whole read began
        # The board's raw views (JSON strings), as last read; entries parse only what changed.
        self._static_raw: dict[str, str] = {}
        self._status_raw: dict[str, str] = {}
        self._used_raw: dict[str, str] = {}
        self._group_of: dict[str, Group] = {}
        self._groups_by_key: dict[tuple[float, float, tuple[tuple[str, str], ...]], Group] = {}
        #: The label sets of the live workers on the board, whatever their state (``carries``).
        self._label_sets: set[tuple[tuple[str, str], ...]] = set()
        #: Workers whose dispatches failed: worker id -> (until when, monotonic; failures in a row).
        self._benched: dict[str, tuple[float, int]] = {}
        self._lock = asyncio.Lock()

    # --- refresh ------------------------------------------------------------------------------------------

    @property
    def age_s(self) -> float:
        return time.monotonic() - self._mono_at_refresh if self._mono_at_refresh else float("inf")

    def redis_now_ms(self) -> int:
        """The Redis clock, extrapolated from the last refresh with the local monotonic clock."""
        return self.now_ms + int((time.monotonic() - self._mono_at_refresh) * 1000)

    async def refresh(self, *, if_older_than_s: float = 0.0, unless_read_since: float | None = None) -> None:
        """Read what changed on the board. ``if_older_than_s``: skip when the mirror is younger. ``unless_read_since``
        (a ``time.monotonic()``): skip when a read began after it; a request that found no candidate needs a read
        that began after it looked, and concurrent ones share it."""
        async with self._lock:
            if self.age_s < if_older_than_s:
                return  # another request refreshed while we waited
            if unless_read_since is not None and self._read_began >= unless_read_since:
                return
            self._read_began = time.monotonic()
            whole_read_due = self._read_began - self._whole_read_began >= self.whole_read_every_s
            read = await self.store.read_board(None if whole_read_due else self._changes_since_ms)
            if not read.complete and (self._board_replaced(read.epoch) or self._clock_went_back(read.now_ms)):
                read = await self.store.read_board(None)
            if read.complete:
                self._whole_read_began = self._read_began
            self.apply(read)
            self._epoch = read.epoch
            # A little overlap: a change is stamped with the Redis clock of the script that made it.
            self._changes_since_ms = read.now_ms - _CHANGE_OVERLAP_MS
            forgotten = [e.worker_id for e in self.entries.values()
                         if e.heartbeat_ms and read.now_ms - e.heartbeat_ms > self.retention_ms]
            if forgotten:
                # One the board no longer holds leaves no change to read: this mirror drops it itself.
                self._drop(await self.store.forget_on_board(forgotten))

    def apply(self, read: BoardRead) -> None:
        """Bring the mirror up to a read of the board: the whole board, or (a delta) only the workers it names."""
        if read.complete:
            # Only the workers whose views differ from the mirror's are rebuilt, so a periodic whole read of an
            # unchanged board costs comparisons, and every worker a delta missed is corrected.
            static, status, used = _present(read.static), _present(read.status), _present(read.used)
            changed = (_differing(self._static_raw, static) | _differing(self._status_raw, status)
                       | _differing(self._used_raw, used))
            self._static_raw, self._status_raw, self._used_raw = static, status, used
        else:
            _apply(self._static_raw, read.static)
            _apply(self._status_raw, read.status)
            _apply(self._used_raw, read.used)
            changed = read.static.keys() | read.status.keys() | read.used.keys()
        self._rebuild(changed, read.now_ms)

    def _drop(self, worker_ids: Iterable[str]) -> None:
        """Forget workers the board does not hold, though no read reported them gone."""
        dropped = [wid for wid in worker_ids if self._static_raw.pop(wid, None) is not None]
        for wid in dropped:
            self._status_raw.pop(wid, None)
            self._used_raw.pop(wid, None)
            self.entries.pop(wid, None)
        if dropped:
            self._regroup()

    def _board_replaced(self, epoch: str) -> bool:
        """Whether the board is another dataset than at the last read: a Redis that restarted empty (or was flushed)
        logged no removal of the workers it lost, so a delta read would keep them in this mirror for good."""
        if self._epoch is None or epoch == self._epoch:
            return False
        log.warning("the routing board is not the one this hub last read (Redis restarted empty?); reading it whole")
        return True

    def _clock_went_back(self, read_now_ms: int) -> bool:
        """Whether the Redis clock is behind where the last read left it by more than the delta reads' overlap.

        A failover to a replica whose clock is behind stamps its changes before this hub's cursor, and a delta
        read would never return them (a registration view is written only once). The estimate extrapolates the last
        read's clock from when its answer had been applied, so it never runs ahead of the real Redis clock: a
        healthy server is never taken for a stepped one."""
        expected_ms = self.now_ms + int((self._read_began - self._mono_at_refresh) * 1000)
        if read_now_ms >= expected_ms - _CLOCK_STEP_TOLERANCE_MS:
            return False
        log.warning("the Redis clock is %d ms behind this hub's last read of the board (a failover?); reading the "
                    "whole board", expected_ms - read_now_ms)
        return True

    def _rebuild(self, changed: Iterable[str], now_ms: int) -> None:
        """Bring the entries of the workers that changed up to date.

        At 10,000 workers, rebuilding every entry each refresh blocked the event loop for 60-140 ms a second;
        a delta touches only the workers that heartbeated since (a third of them at a 3 s interval and a 1 s
        refresh), and an unchanged view string is never parsed again.
        """
        # In name order, not the set's: a new worker's place in ``entries`` breaks ties in ranking, and a set's order
        # changes with the interpreter's hash seed, so the routing bench gave other figures on each run (0.25 ms for
        # the 3,333 workers a refresh sees change at 10,000).
        for wid in sorted(changed):
            if wid in self._static_raw:
                self._update(wid, self.entries.get(wid))
            else:
                self.entries.pop(wid, None)
        self.now_ms = now_ms
        self._mono_at_refresh = time.monotonic()
        self._regroup()

    def _update(self, wid: str, e: Entry | None) -> None:
        static_raw = self._static_raw[wid]
        raw = self._status_raw.get(wid)
        used = int(self._used_raw.get(wid, 0))
        if e is not None and static_raw == e.static_raw and raw == e.status_raw and used == e.used:
            self.entries[wid] = e  # read again only because of the overlap between delta reads
            return
        if e is None or static_raw != e.static_raw:
            st = json.loads(static_raw)
            e = Entry(worker_id=wid, url=st["url"], region=st["region"], zone=st.get("zone"), lat=float(st["lat"]),
                      lon=float(st["lon"]), labels=st.get("labels") or {}, max_streams=int(st["max_streams"]),
                      static=st, static_raw=static_raw)
        if raw is not None and raw != e.status_raw:
            e.status = json.loads(raw)
            e.status_raw = raw
        e.used = used
        e.max_streams = int(e.static["max_streams"])
        e.state = e.status.get("state", "ready")
        e.heartbeat_ms = int(e.status.get("hb", 0))
        e.partial = None
        self.entries[wid] = e

    def _regroup(self) -> None:
        self._groups_by_key = {}
        self._group_of = {}
        self._label_sets = set()
        benched = self._still_benched()
        for e in self.entries.values():
            if alive(e.heartbeat_ms, self.now_ms, self.ttl_ms):  # a silent worker's labels are not on offer
                self._label_sets.add(e.group_key[2])
            if self._eligible(e, self.now_ms) and e.worker_id not in benched:
                if e.partial is None:
                    e.partial = self._partial(e)
                group = self._group_for(e, listed=False)
                group.members.append(e)
                self._group_of[e.worker_id] = group
        for group in self._groups_by_key.values():
            group.members.sort(key=_by_partial, reverse=True)
        self.groups = list(self._groups_by_key.values())

    def _group_for(self, e: Entry, *, listed: bool = True) -> Group:
        """``e``'s group, made if it has none. ``listed``: a new group joins ``groups`` now (a new list, as ranking may
        be iterating the old one), not at the end of a regroup (a copy per new group was quadratic in groups)."""
        group = self._groups_by_key.get(e.group_key)
        if group is None:
            group = self._groups_by_key[e.group_key] = Group(lat=e.lat, lon=e.lon, labels=e.labels, members=[])
            if listed:
                self.groups = [*self.groups, group]
        return group

    def _partial(self, e: Entry, policy: Policy | None = None) -> float:
        load, latency, capacity = load_factors(e.used, e.max_streams, e.gpu_utilization, e.latency_ms,
                                               policy or self.policy)
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
        before, e.partial = e.partial, self._partial(e)
        if e.used >= e.max_streams:
            self._leave_group(e)
            return
        group = self._group_of.get(e.worker_id)
        if group is not None:
            if e.partial != before:  # keep the group in score order: ranking looks only at its head
                group.members.remove(e)
                bisect.insort(group.members, e, key=_descending_partial)
        elif self._eligible(e, self.redis_now_ms()) and not self._is_benched(worker_id):
            group = self._group_for(e)  # a slot came back: rejoin, in score order
            bisect.insort(group.members, e, key=_descending_partial)
            self._group_of[e.worker_id] = group

    def note_unavailable(self, worker_id: str) -> None:
        """Skip this worker until the next refresh (the reservation script said it is not ready)."""
        e = self.entries.get(worker_id)
        if e is not None:
            e.state = "unavailable"
            self._leave_group(e)

    def note_failed_dispatch(self, worker_id: str, why: str) -> None:
        """Leave this worker out of the ranking for a while (``BENCH_BASE_S``, doubled at each failure in a row)."""
        _, failures = self._benched.get(worker_id, (0.0, 0))
        bench_s = min(BENCH_BASE_S * 2 ** failures, BENCH_CAP_S)
        self._benched[worker_id] = (time.monotonic() + bench_s, failures + 1)
        log.warning("dispatches skip worker %s for %.0f s on this hub: its dispatch failed (%s, %d in a row)",
                    worker_id, bench_s, why, failures + 1)
        self.note_unavailable(worker_id)

    def note_dispatched(self, worker_id: str) -> None:
        """A dispatch succeeded: the worker's failures in a row are over."""
        self._benched.pop(worker_id, None)

    def lift_benches(self, tried: Collection[str] = ()) -> bool:
        """Put the benched workers not in ``tried`` back in the ranking now (their failures in a row still count);
        whether there was any. For a placement that found no other candidate: a blip of the hub's own network benches
        every worker it tried, and the fleet, healthy and idle, was answered no_capacity until the benches ran out."""
        lifted = self._still_benched().difference(tried)
        if not lifted:
            return False
        for wid in lifted:
            self._benched[wid] = (0.0, self._benched[wid][1])
            if (e := self.entries.get(wid)) is not None and e.state == "unavailable":  # set by its failed dispatch
                e.state = e.status.get("state", "ready")
        self._regroup()
        return True

    def _still_benched(self) -> set[str]:
        """The workers whose bench has not run out. The others keep their count of failures in a row (the next
        failure benches them longer) until a dispatch succeeds or they leave the board."""
        if not self._benched:
            return set()
        for gone in [wid for wid in self._benched if wid not in self.entries]:
            del self._benched[gone]
        now = time.monotonic()
        return {wid for wid, (until, _) in self._benched.items() if until > now}

    def _is_benched(self, worker_id: str) -> bool:
        bench = self._benched.get(worker_id)
        return bench is not None and bench[0] > time.monotonic()

    def _leave_group(self, e: Entry) -> None:
        group = self._group_of.pop(e.worker_id, None)
        if group is not None:
            group.members.remove(e)

    # --- ranking ------------------------------------------------------------------------------------------

    def rank(self, lat: float, lon: float, labels: dict[str, str] | None = None, *, policy: Policy | None = None,
             limit: int = _RANKED_MAX, explain: bool = False) -> list[Ranked]:
        """Best candidates first; the head is drawn from the near-best so many hubs do not herd.

        A member's score is its group's distance term plus its cached partial score (``Entry.partial``, what
        ``hub.scoring.score`` adds to the distance term): the per-member work of a request is one addition, and
        ``Factors`` are built only when an explanation asks for them.
        """
        policy = policy or self.policy
        cached = policy is self.policy
        now = self.redis_now_ms()
        want = labels or {}
        w = self.weights
        scored: list[tuple[float, float, Entry]] = []  # (score, km, entry)
        candidates: list[tuple[Group, float]] = []
        reach: list[tuple[Group, float, float]] = []  # (group, km, distance term)
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
        per_group = _TOP_PER_GROUP
        for group, km in candidates:
            near = w.distance * distance_factor(max(0.0, km - nearest_km))
            reach.append((group, km, near))
            taken = 0
            for e in group.members:
                if taken >= per_group and not explain:
                    break
                if not self._eligible(e, now):
                    continue
                partial = e.partial if cached and e.partial is not None else self._partial(e, policy)
                scored.append((near + partial, km, e))
                taken += 1
        scored.sort(key=_by_score, reverse=True)
        ranked = [Ranked(e, s, km, nearest_km, policy) for s, km, e in scored[:limit]]
        if explain or not ranked:
            return ranked
        best = ranked[0].score
        if cached:
            drawn = self._draw_near_best(best, reach, now)
        else:  # another policy's scores do not follow the groups' order: draw among those scored
            drawn = self.rng.choice([item for item in scored if best - item[0] <= self.near_best_margin])
        score, km, lead = drawn
        rest = [r for r in ranked if r.entry is not lead]
        return [Ranked(lead, score, km, nearest_km, policy), *rest[:limit - 1]]

    def carries(self, labels: dict[str, str]) -> bool:
        """Whether any live worker on the board, in any state (full or drained ones come back), has ``labels``, as
        of the last refresh: one look per set of labels the fleet has, not per worker. A worker that stopped
        heartbeating does not count: its group scaled in or died, and a client told to retry every second would do
        so until retention forgot it, an hour later."""
        wanted = set(labels.items())
        return any(wanted <= set(label_set) for label_set in self._label_sets)

    def near_best(self, ranked: list[Ranked]) -> list[Ranked]:
        """The candidates a placement may lead with: all within ``near_best_margin`` of the best."""
        if not ranked:
            return []
        best = ranked[0].score
        return [r for r in ranked if best - r.score <= self.near_best_margin]

    def _draw_near_best(self, best: float, reach: list[tuple[Group, float, float]],
                        now: int) -> tuple[float, float, Entry]:
        """(score, km, entry) of an eligible worker drawn uniformly from all within ``near_best_margin`` of ``best``.

        Uniformly: within the margin the candidates share the traffic (``near_best_margin``), and any lean toward
        the higher score makes hubs with the same snapshot collide on the same worker again; a clearly better worker
        still wins, since none outside the margin ever leads. Each group's members are in score order, so its
        near-best are a prefix found by bisection: the work grows with the groups, not with the idle workers.
        """
        margin = self.near_best_margin
        spans = [(group, km, near, _near_best_count(group.members, near, best, margin)) for group, km, near in reach]
        total = sum(count for *_, count in spans)
        for _ in range(_LEAD_DRAWS):  # a member whose heartbeat lapsed since the refresh is drawn again
            i = self.rng.randrange(total)
            for group, km, near, count in spans:
                if i < count:
                    e = group.members[i]
                    if self._eligible(e, now):
                        return near + _by_partial(e), km, e
                    break
                i -= count
        near_best = [(near + _by_partial(e), km, e) for group, km, near, count in spans
                     for e in group.members[:count] if self._eligible(e, now)]
        return self.rng.choice(near_best)  # never empty: the best is eligible and within the margin


#: How far back each delta read reaches before the previous read's Redis time.
_CHANGE_OVERLAP_MS = 100
#: A Redis clock found this far behind the last read's (half the overlap, so a step the overlap would not cover is
#: always caught) makes the hub read the whole board.
_CLOCK_STEP_TOLERANCE_MS = _CHANGE_OVERLAP_MS // 2


def _apply(mirror: dict[str, str], changes: dict[str, str | None]) -> None:
    for wid, raw in changes.items():
        if raw is None:
            mirror.pop(wid, None)
        else:
            mirror[wid] = raw


def _present(read: dict[str, str | None]) -> dict[str, str]:
    return {wid: raw for wid, raw in read.items() if raw is not None}


def _differing(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """The workers whose view is not the same in both (added, removed or changed)."""
    return {wid for wid, raw in after.items() if before.get(wid) != raw} | (before.keys() - after.keys())


def _near_best_count(members: list[Entry], near: float, best: float, margin: float) -> int:
    """How many of a group's members (best partial score first) score within ``margin`` of ``best``."""
    return bisect.bisect_right(members, margin, key=lambda e: best - (near + _by_partial(e)))


def _by_score(item: tuple[float, float, Entry]) -> float:
    return item[0]


def _by_partial(e: Entry) -> float:
    return e.partial if e.partial is not None else 0.0


def _descending_partial(e: Entry) -> float:
    return -_by_partial(e)
