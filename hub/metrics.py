"""Prometheus metrics of a hub. Fleet gauges are computed at scrape time from the routing board mirror.

A hub run as several processes (``fleet hub --workers N``) counts in prometheus_client's multiprocess mode: each
process writes its counters to files in ``PROMETHEUS_MULTIPROC_DIR`` (``fleet hub`` makes one), and a scrape of any
of them sums them all, so ``/metrics`` says what the whole hub did whichever process answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from hub.capacity import capacity_by_region, empty_capacity, status_of

if TYPE_CHECKING:
    from hub.board import RoutingBoard


ALLOCATION_OUTCOMES = ("created", "reused", "no_capacity", "no_matching_worker", "pending", "conflict", "rate_limited",
                       "error")
# hub.dispatch.DispatchOutcome values; "accepted" counts here when the worker took the session but its lease
# could not be confirmed (it expired meanwhile).
DISPATCH_FAILURE_REASONS = ("accepted", "full", "refused", "timeout", "unreachable")
#: The ``state`` label of ``fleet_workers``: every one is exported for every region on the board, 0 when empty.
WORKER_STATES = ("ready", "draining", "stale")
#: Set (by ``fleet hub --workers N``) before any process imports prometheus_client: counters go to files there.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.allocations = Counter(
            "fleet_allocations", "Session requests by outcome (" + ", ".join(ALLOCATION_OUTCOMES) + ").",
            ["outcome"], registry=self.registry)
        self.allocation_seconds = Histogram(
            "fleet_allocation_seconds", "Time to answer a session request, by outcome.", ["outcome"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self.dispatch_failures = Counter(
            "fleet_dispatch_failures", "Dispatches to workers that did not end in a session, by reason.",
            ["reason"], registry=self.registry)
        self.heartbeats = Counter(
            "fleet_heartbeats", "Heartbeats received, by result (ok, unknown, forbidden).", ["result"],
            registry=self.registry)
        self.registrations = Counter(
            "fleet_registrations", "Worker registrations, by result (ok, conflict).", ["result"],
            registry=self.registry)

        # Known label values start at zero so rate() and absent-series alerts work before the first event.
        for outcome in ALLOCATION_OUTCOMES:
            self.allocations.labels(outcome=outcome)
            self.allocation_seconds.labels(outcome=outcome)
        for reason in DISPATCH_FAILURE_REASONS:
            self.dispatch_failures.labels(reason=reason)
        for result in ("ok", "unknown", "forbidden"):
            self.heartbeats.labels(result=result)
        #: The per-heartbeat series, looked up once (``labels()`` costs a lock and a dict lookup per call).
        self.heartbeats_ok = self.heartbeats.labels(result="ok")
        for result in ("ok", "conflict"):
            self.registrations.labels(result=result)

        # What a scrape reads: this process's own registry, or every process's files plus the fleet gauges.
        self._exposed = self.registry
        if os.environ.get(MULTIPROCESS_DIR_ENV):
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]

    def count_allocation(self, outcome: str, started: float) -> None:
        """One answer to a session request, with the time since ``started`` (``time.perf_counter()``)."""
        self.allocations.labels(outcome=outcome).inc()
        self.allocation_seconds.labels(outcome=outcome).observe(time.perf_counter() - started)

    def watch_board(self, board: RoutingBoard) -> None:
        collector = _BoardCollector(board)
        self.registry.register(collector)
        if self._exposed is not self.registry:
            self._exposed.register(collector)  # the same in every process: each has its own board mirror

    def exposition(self) -> bytes:
        """The text a scrape gets."""
        return generate_latest(self._exposed)


class _BoardCollector(Collector):
    def __init__(self, board: RoutingBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        now = self.board.redis_now_ms()
        ttl = self.board.ttl_ms
        by_state = GaugeMetricFamily("fleet_workers", "Registered workers by region and state.",
                                     labels=["region", "state"])
        used = GaugeMetricFamily("fleet_streams_used", "Stream slots in use on live workers.", labels=["region"])
        free = GaugeMetricFamily("fleet_streams_free", "Free stream slots on live, ready workers.", labels=["region"])
        capacity = GaugeMetricFamily("fleet_streams_max",
                                     "Stream slots of live workers, draining ones included; fullness is 1 - free / "
                                     "max.", labels=["region"])
        age = GaugeMetricFamily("fleet_heartbeat_age_max_seconds",
                                "Oldest heartbeat among live workers; in a region with none live, its latest "
                                "heartbeat: how long it has been silent.", labels=["region"])
        latency = GaugeMetricFamily("fleet_worker_latency_ms_max", "Highest reported engine latency.",
                                    labels=["region"])
        entries = list(self.board.entries.values())
        counts: dict[tuple[str, str], int] = {}
        oldest_live_ms: dict[str, int] = {}
        latest_heard_ms: dict[str, int] = {}
        slowest_ms: dict[str, float] = {}
        for e in entries:
            state = status_of(e, now, ttl)
            live = state != "stale"
            counts[(e.region, state)] = counts.get((e.region, state), 0) + 1
            slowest_ms.setdefault(e.region, 0.0)
            if e.heartbeat_ms > 0:
                latest_heard_ms[e.region] = max(latest_heard_ms.get(e.region, 0), e.heartbeat_ms)
            if live:
                oldest_live_ms[e.region] = min(oldest_live_ms.get(e.region, e.heartbeat_ms), e.heartbeat_ms)
                slowest_ms[e.region] = max(slowest_ms[e.region], e.latency_ms)
        # The API's and CloudWatch's own figures; a region whose workers are all stale reports zeros.
        by_region = {cap.region: cap for cap in capacity_by_region(entries, now, ttl).regions}
        for region in sorted({e.region for e in entries}):
            for state in WORKER_STATES:
                by_state.add_metric([region, state], counts.get((region, state), 0))
            cap = by_region.get(region) or empty_capacity(region)
            used.add_metric([region], cap.used_streams)
            free.add_metric([region], cap.free_streams)
            capacity.add_metric([region], cap.max_streams)
            # Not 0 when every worker went silent: that would read "healthy" just as FleetHeartbeatsLagging should
            # fire. A region never heard from at all has no age to report.
            heard_ms = oldest_live_ms.get(region, latest_heard_ms.get(region))
            if heard_ms is not None:
                age.add_metric([region], max(0.0, (now - heard_ms) / 1000))
            latency.add_metric([region], slowest_ms[region])
        yield from (by_state, used, free, capacity, age, latency)
