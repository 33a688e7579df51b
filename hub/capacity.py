"""Per-region capacity from the routing board's entries: one definition for the API, CloudWatch and Prometheus.

Pure: it takes the entries and the Redis clock and returns figures, with no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from shared.models import FleetCapacity, RegionCapacity

if TYPE_CHECKING:
    from hub.board import Entry


def alive(heartbeat_ms: int, now_ms: int, ttl_ms: int) -> bool:
    """Heard from within the TTL (a registration that never heartbeat counts from its registration)."""
    return heartbeat_ms > 0 and now_ms - heartbeat_ms < ttl_ms


def status_of(e: Entry, now_ms: int, ttl_ms: int) -> str:
    """``ready``, ``draining`` or ``stale``: what ``WorkerView.status`` says of the entry, as the listings filter and
    the per-state gauges count it."""
    if not alive(e.heartbeat_ms, now_ms, ttl_ms):
        return "stale"
    return "draining" if e.state == "draining" else "ready"


def capacity_by_region(entries: Iterable[Entry], now_ms: int, ttl_ms: int) -> FleetCapacity:
    """Live workers per region: all their slots (``max_streams``, draining workers included: that capacity is on its
    way out, so fullness rises while it drains), the slots in use, and the free slots of ready workers only (what
    new sessions can use)."""
    per: dict[str, _Tally] = {}
    for e in entries:
        if not alive(e.heartbeat_ms, now_ms, ttl_ms):
            continue
        tally = per.get(e.region)
        if tally is None:
            tally = per[e.region] = _Tally()
        tally.add(e)
    total = _Tally()
    for tally in per.values():
        total.merge(tally)
    return FleetCapacity(regions=[per[region].capacity(region) for region in sorted(per)],
                         total=total.capacity("all"))


@dataclass(slots=True)
class _Tally:
    """A region's figures while the entries are counted: plain ints (a pydantic model's attribute writes made the
    count of 10,000 workers take 50 ms of the hub's loop at every dashboard refresh and scrape)."""

    workers: int = 0
    ready_workers: int = 0
    max_streams: int = 0
    used_streams: int = 0
    free_streams: int = 0

    def add(self, e: Entry) -> None:
        self.workers += 1
        self.max_streams += e.max_streams
        self.used_streams += e.used
        if e.state != "draining":
            self.ready_workers += 1
            self.free_streams += max(0, e.max_streams - e.used)

    def merge(self, other: _Tally) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def capacity(self, region: str) -> RegionCapacity:
        return RegionCapacity(region=region, **asdict(self))


def empty_capacity(region: str) -> RegionCapacity:
    return RegionCapacity(region=region, workers=0, ready_workers=0, max_streams=0, used_streams=0, free_streams=0)
