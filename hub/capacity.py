"""Per-region capacity from the routing board's entries: one definition for the API, CloudWatch and Prometheus.

Pure: it takes the entries and the Redis clock and returns figures, with no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from shared.models import FleetCapacity, RegionCapacity

if TYPE_CHECKING:
    from hub.board import Entry


def alive(heartbeat_ms: int, now_ms: int, ttl_ms: int) -> bool:
    """Heard from within the TTL (a registration that never heartbeat counts from its registration)."""
    return heartbeat_ms > 0 and now_ms - heartbeat_ms < ttl_ms


def capacity_by_region(entries: Iterable[Entry], now_ms: int, ttl_ms: int) -> FleetCapacity:
    """Live workers per region: all their slots (``max_streams``, draining workers included: that capacity is on its
    way out, so fullness rises while it drains), the slots in use, and the free slots of ready workers only (what
    new sessions can use)."""
    per: dict[str, RegionCapacity] = {}
    total = empty_capacity("all")
    for e in entries:
        if not alive(e.heartbeat_ms, now_ms, ttl_ms):
            continue
        for cap in (per.setdefault(e.region, empty_capacity(e.region)), total):
            cap.workers += 1
            cap.max_streams += e.max_streams
            cap.used_streams += e.used
            if e.state != "draining":
                cap.ready_workers += 1
                cap.free_streams += max(0, e.max_streams - e.used)
    return FleetCapacity(regions=sorted(per.values(), key=lambda c: c.region), total=total)


def empty_capacity(region: str) -> RegionCapacity:
    return RegionCapacity(region=region, workers=0, ready_workers=0, max_streams=0, used_streams=0, free_streams=0)
