"""The worker registry as the API sees it: registration, heartbeats, deregistration, SRE views and steering."""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from hub.board import Entry, RoutingBoard
from hub.capacity import alive, capacity_by_region, status_of
from hub.dispatch import WorkerClient
from hub.metrics import HubMetrics
from hub.settings import HubSettings
from hub.store import FleetStore
from hub.tasks import BackgroundTasks
from shared.auth import digest, new_secret
from shared.errors import WorkerAlive, WorkerConflict, WorkerCredentialInvalid, WorkerUnknown
from shared.geo import AWS_REGIONS
from shared.models import (
    DEFAULT_PAGE,
    FleetCapacity,
    GpuInfo,
    Heartbeat,
    HeartbeatReply,
    Location,
    RegistrationAccepted,
    SessionSummary,
    WorkerRegistration,
    WorkerState,
    WorkerView,
)

log = logging.getLogger(__name__)

#: The most workers whose sessions one page of the session listing reads (three commands each, pipelined).
SESSION_PAGE_WORKERS = 500
#: Workers read per round trip while a page of sessions is gathered: a page that fills early stops reading.
_SESSION_READ_CHUNK = 100
#: A session this hub told a worker to stop is not stopped again through its DELETE within this time (its heartbeats
#: may name it a few more times before the stop lands).
_STOP_AGAIN_AFTER_S = 30.0


class Registry:
    def __init__(self, settings: HubSettings, store: FleetStore, board: RoutingBoard, metrics: HubMetrics,
                 workers: WorkerClient, background: BackgroundTasks) -> None:
        self.settings = settings
        self.store = store
        self.board = board
        self.metrics = metrics
        self.workers = workers
        self.background = background
        #: Sessions this hub stopped through a worker's DELETE, oldest first, and when.
        self._stopped_at: OrderedDict[str, float] = OrderedDict()
        #: Per worker: when its current stop window began, and how many DELETEs it has been sent in it.
        self._stop_budget: dict[str, tuple[float, int]] = {}

    async def register(self, reg: WorkerRegistration, presented_secret: str | None,
                       proposed_secret: str | None = None) -> RegistrationAccepted:
        """``proposed_secret``: the new secret the worker chose, so that resending a registration whose answer was
        lost is the same registration (the script finds its digest stored), not a second one that the worker's
        current secret can no longer take over."""
        loc = reg.location or _region_center(reg.region)
        static = {
            "worker_id": reg.worker_id, "url": reg.url, "region": reg.region, "zone": reg.zone,
            "lat": loc.lat, "lon": loc.lon, "max_streams": reg.max_streams,
            "gpus": [g.model_dump() for g in reg.gpus], "instance_type": reg.instance_type,
            "labels": reg.labels, "engine": reg.engine, "audio_url": reg.audio_url, "registered_at": time.time(),
        }
        fields = {"url": reg.url, "region": reg.region, "max_streams": str(reg.max_streams),
                  "worker_state": reg.state.value}
        secret = proposed_secret or new_secret()
        registered = await self.store.register(reg.worker_id, presented_secret, secret, fields,
                                               json.dumps(static, separators=(",", ":")),
                                               drain_requested=reg.drain_requested)
        if registered is None:
            self.metrics.registrations.labels(result="conflict").inc()
            raise WorkerConflict(f"worker {reg.worker_id} is registered and alive; present its X-Worker-Secret")
        self.metrics.registrations.labels(result="ok").inc()
        log.info("worker %s registered in %s with %d streams", reg.worker_id, reg.region, reg.max_streams)
        return RegistrationAccepted(worker_id=reg.worker_id, heartbeat_interval_s=self.settings.heartbeat_interval_s,
                                    ttl_s=self.settings.worker_ttl_s, worker_secret=secret,
                                    state=WorkerState(registered.state))

    async def heartbeat(self, worker_id: str, secret: str | None, hb: Heartbeat, *,
                        secret_digest: str | None = None) -> HeartbeatReply:
        """``secret_digest``: the secret's digest when the caller already has it (a channel digests it once)."""
        if not secret:
            self.metrics.heartbeats.labels(result="forbidden").inc()
            raise WorkerCredentialInvalid("heartbeats must carry the worker's X-Worker-Secret")
        status = hb.model_dump_json(exclude={"active_sessions", "state", "seq", "ack"})
        out = await self.store.heartbeat(worker_id, secret_digest or digest(secret), hb.state.value, status,
                                         hb.active_sessions, hb.seq)
        if out.status == 0:
            self.metrics.heartbeats.labels(result="unknown").inc()
            raise WorkerUnknown(f"worker {worker_id} is not registered; register again")
        if out.status < 0:
            self.metrics.heartbeats.labels(result="forbidden").inc()
            raise WorkerCredentialInvalid("the X-Worker-Secret does not match this worker")
        self.metrics.heartbeats_ok.inc()
        self.board.note_used(worker_id, out.used, out.max_streams)
        if out.unknown_sessions:
            self._stop_unknown(worker_id, out.unknown_sessions, out.max_streams)
        # Built from values the hub itself produced, so without re-validation (one per heartbeat).
        return HeartbeatReply.model_construct(
            worker_id=worker_id, state=WorkerState(out.state), used_streams=out.used, max_streams=out.max_streams,
            heartbeat_interval_s=self.settings.heartbeat_interval_s, stop_sessions=list(out.unknown_sessions))

    def _stop_unknown(self, worker_id: str, session_ids: Sequence[str], max_streams: int) -> None:
        """Sessions the worker runs that no hub holds: the heartbeat's answer names them in ``stop_sessions``, and the
        worker's own ``DELETE /sessions/{id}`` stops them too, so a worker that ignores the answer still keeps no
        uncounted session. Once per session per ``_STOP_AGAIN_AFTER_S``, one task per heartbeat: after a Redis wipe,
        when every worker names all its sessions, the calls grow with the workers, not their heartbeats. At most
        ``max_streams`` DELETEs per worker per ``_STOP_AGAIN_AFTER_S`` (no worker runs more sessions than that): a
        worker naming fresh made-up ids in every heartbeat would otherwise have the hub send a thousand requests
        per heartbeat to whatever URL it registered, and remember every id."""
        entry = self.board.entries.get(worker_id)
        if entry is None:
            return  # not on this hub's board yet: the answer's stop_sessions still reaches the worker
        now = time.monotonic()
        stopped = self._stopped_at
        while stopped and now - next(iter(stopped.values())) >= _STOP_AGAIN_AFTER_S:
            stopped.popitem(last=False)  # forgotten from the oldest end: the work grows with the stops, not the list
        began, sent = self._stop_budget.get(worker_id, (now, 0))
        if now - began >= _STOP_AGAIN_AFTER_S:
            began, sent = now, 0
        due = [sid for sid in session_ids if sid not in stopped][:max(0, max_streams - sent)]
        if not due:
            return
        self._stop_budget[worker_id] = (began, sent + len(due))
        stopped.update(dict.fromkeys(due, now))
        self.background.spawn(self._stop_each(entry.url, due), name=f"stop unknown sessions on {worker_id}")

    async def _stop_each(self, worker_url: str, session_ids: list[str]) -> None:
        for sid in session_ids:
            await self.workers.stop(worker_url, sid)

    async def deregister(self, worker_id: str, secret: str | None) -> None:
        if not secret:
            raise WorkerCredentialInvalid("deregistration must carry the worker's X-Worker-Secret")
        result = await self.store.deregister(worker_id, secret)
        if result == 0:
            raise WorkerUnknown(f"worker {worker_id} is not registered")
        if result < 0:
            raise WorkerCredentialInvalid("the X-Worker-Secret does not match this worker")
        log.info("worker %s deregistered", worker_id)

    async def forget(self, worker_id: str) -> None:
        """An SRE removes a worker that stopped heartbeating (its instance is gone) before retention would."""
        result = await self.store.deregister(worker_id, None)
        if result == 0:
            raise WorkerUnknown(f"no worker {worker_id}")
        if result == -2:
            raise WorkerAlive(f"worker {worker_id} is live: it would register again at its next heartbeat; stop "
                              "its process first")
        log.info("worker %s forgotten by an SRE", worker_id)

    async def set_drain(self, worker_id: str, drain: bool) -> WorkerView:
        if await self.store.set_drain(worker_id, drain) is None:
            raise WorkerUnknown(f"no worker {worker_id}")
        log.info("worker %s %s by an SRE", worker_id, "drained" if drain else "resumed")
        return await self.view(worker_id)

    # --- views --------------------------------------------------------------------------------------------

    async def view(self, worker_id: str) -> WorkerView:
        read = await self.store.read_worker(worker_id)
        if read is None:
            raise WorkerUnknown(f"no worker {worker_id}")
        now_ms, used, info = read
        static = json.loads(info.get("static", "{}"))
        status = json.loads(info.get("status", "{}"))
        hb = int(info.get("hb", 0))
        drain = info.get("drain") == "1"
        state = "draining" if drain or info.get("worker_state") == "draining" else "ready"
        return _view(static, status, used=used, state=state, drain=drain, heartbeat_ms=hb, now_ms=now_ms,
                     ttl_ms=self.settings.ttl_ms)

    async def worker_page(self, region: str | None = None, state: str | None = None, *, limit: int = DEFAULT_PAGE,
                          cursor: str | None = None) -> tuple[list[WorkerView], str | None]:
        """One page of workers in (region, id) order after ``cursor``, and the cursor of the next page (None on the
        last). From a fresh read of the routing board: one round trip whatever the fleet size; views are built for
        the page only (views of 10,000 workers held the hub's loop, and its client requests, for a third of a
        second)."""
        await self.board.refresh()
        now, ttl = self.board.now_ms, self.settings.ttl_ms
        after = tuple(cursor.split("/", 1)) if cursor is not None else ("", "")
        chosen = heapq.nsmallest(limit + 1, (
            e for e in self.board.entries.values()
            if (region is None or e.region == region) and (state is None or status_of(e, now, ttl) == state)
            and (e.region, e.worker_id) > after), key=_listing_order)
        page = chosen[:limit]
        next_cursor = f"{page[-1].region}/{page[-1].worker_id}" if len(chosen) > limit else None
        return [_entry_view(e, now, ttl) for e in page], next_cursor

    async def capacity(self) -> FleetCapacity:
        """Per region, from the board's entries as they are (no view per worker: the CloudWatch publisher and the
        dashboard ask often, and at 10,000 workers building views stalled the loop for a third of a second)."""
        await self.board.refresh()
        return capacity_by_region(self.board.entries.values(), self.board.now_ms, self.settings.ttl_ms)

    async def liveness(self, region: str | None = None, worker_id: str | None = None) -> dict[str, bool]:
        """Whether each registered worker (of ``region``, or just ``worker_id``) is alive; raises WorkerUnknown for
        an id the board does not hold."""
        await self.board.refresh()
        now, ttl = self.board.now_ms, self.settings.ttl_ms
        if worker_id is not None:
            entry = self.board.entries.get(worker_id)
            if entry is None or region not in (None, entry.region):
                raise WorkerUnknown(f"worker {worker_id} is not registered")
            return {worker_id: alive(entry.heartbeat_ms, now, ttl)}
        return {e.worker_id: alive(e.heartbeat_ms, now, ttl) for e in self.board.entries.values()
                if region in (None, e.region)}

    async def session_page(
            self, region: str | None = None, worker_id: str | None = None, *, limit: int = DEFAULT_PAGE,
            cursor: str | None = None) -> tuple[list[SessionSummary], str | None]:
        """One page of the sessions the fleet holds (of ``region``, or of ``worker_id``), oldest first, and the next
        page's cursor (None on the last). Pages go worker by worker in id order after the worker ``cursor``: a page
        holds all the sessions of each worker it lists, at most ``limit`` unless one worker alone holds more, and
        reads the keys of at most ``SESSION_PAGE_WORKERS`` workers, so a page may hold fewer sessions and still
        have a next. What one page costs the hub is bounded, whatever the fleet."""
        liveness = await self.liveness(region=region, worker_id=worker_id)
        scan = heapq.nsmallest(SESSION_PAGE_WORKERS + 1, (w for w in liveness if cursor is None or w > cursor))
        more = len(scan) > SESSION_PAGE_WORKERS
        del scan[SESSION_PAGE_WORKERS:]
        alive = {w for w in scan if liveness[w]}
        page: list[SessionSummary] = []
        last: str | None = None
        for start in range(0, len(scan), _SESSION_READ_CHUNK):
            chunk = scan[start:start + _SESSION_READ_CHUNK]
            held = await self.store.sessions_of(chunk, alive=alive)
            for wid in chunk:
                records = held.get(wid, {})
                if page and len(page) + len(records) > limit:
                    return _oldest_first(page), last
                page.extend(_session_summary(sid, r) for sid, r in records.items())
                last = wid
        return _oldest_first(page), last if more else None


def _session_summary(session_id: str, r: dict[str, Any]) -> SessionSummary:
    return SessionSummary(session_id=session_id, session_key=r.get("session_key"), worker_id=r["worker_id"],
                          worker_region=r["worker_region"], livekit_region=r["livekit_region"], room=r["room"],
                          status=r["status"], created_at=r["created_at"],
                          location=Location.model_validate(r["location"]) if r.get("location") else None)


def _oldest_first(sessions: list[SessionSummary]) -> list[SessionSummary]:
    return sorted(sessions, key=lambda s: s.created_at)


def _region_center(region: str) -> Location:
    """Where a worker that sent no location stands; its registration was refused if the region is unknown."""
    loc = AWS_REGIONS[region]
    return Location(lat=loc.lat, lon=loc.lon)


def _listing_order(e: Entry) -> tuple[str, str]:
    return e.region, e.worker_id


def _entry_view(e: Entry, now_ms: int, ttl_ms: int) -> WorkerView:
    state = "draining" if e.state == "draining" else "ready"
    return _view(e.static, e.status, used=e.used, state=state, drain=bool(e.status.get("drain", False)),
                 heartbeat_ms=e.heartbeat_ms, now_ms=now_ms, ttl_ms=ttl_ms)


def _view(static: dict[str, Any], status: dict[str, Any], *, used: int, state: str, drain: bool, heartbeat_ms: int,
          now_ms: int, ttl_ms: int) -> WorkerView:
    max_streams = int(static.get("max_streams", 0))
    live, held = alive(heartbeat_ms, now_ms, ttl_ms), WorkerState(state)
    return WorkerView(
        worker_id=static["worker_id"], url=static["url"], region=static["region"], zone=static.get("zone"),
        location=Location(lat=static["lat"], lon=static["lon"]), state=held,
        status=held.value if live else "stale", drain_requested=drain,
        alive=live, max_streams=max_streams, used_streams=used,
        free_streams=max(0, max_streams - used) if live and state == "ready" else 0,
        heartbeat_age_s=round(max(0, now_ms - heartbeat_ms) / 1000, 3) if heartbeat_ms else None,
        latency_ms=float(status.get("latency_ms", 0.0)), error_rate=float(status.get("error_rate", 0.0)),
        cpu_percent=float(status.get("cpu_percent", 0.0)), memory_percent=float(status.get("memory_percent", 0.0)),
        gpu_utilization=float(status.get("gpu_utilization", 0.0)), vram_used_mb=int(status.get("vram_used_mb", 0)),
        gpus=[GpuInfo.model_validate(g) for g in static.get("gpus", [])], instance_type=static.get("instance_type"),
        labels=static.get("labels") or {}, engine=static.get("engine"),
        registered_at=float(static.get("registered_at", 0.0)),
    )
