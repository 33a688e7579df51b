"""Placing a session: affinity, ranking, atomic reservation, dispatch, then confirmation or release."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hub.board import Ranked, RoutingBoard
from hub.dispatch import DispatchOutcome, WorkerClient
from hub.livekit import choose_deployment, mint_agent_token, mint_participant_token
from hub.metrics import HubMetrics
from hub.settings import HubSettings, LiveKitDeployment
from hub.store import FleetStore, StoredSession
from hub.tasks import BackgroundTasks
from shared import keys
from shared.backoff import backoff_delays
from shared.errors import NoCapacity, SessionNotFound, SessionPending, StoreUnavailable
from shared.geo import region_location
from shared.models import LiveKitConfig, Location, SessionConfig, SessionDispatch, SessionRequest, WorkerRef

log = logging.getLogger(__name__)

_PENDING = "pending:"
#: Reservation attempts per request; each is one Lua call, refused ones cost ~0.1 ms.
_MAX_RESERVATIONS = 64
#: Tries to release a reservation whose placement failed (the store may be what failed).
_UNDO_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class ResolvedLocation:
    location: Location
    source: str  # body | cloudfront | region | default


def resolve_location(req_location: Location | None, header_location: Location | None, region: str | None,
                     default_region: str) -> ResolvedLocation:
    """Body location, then CloudFront's viewer headers, then the requested region, then the default."""
    if req_location is not None:
        return ResolvedLocation(req_location, "body")
    if header_location is not None:
        return ResolvedLocation(header_location, "cloudfront")
    if region and (loc := region_location(region)):
        return ResolvedLocation(Location(lat=loc.lat, lon=loc.lon), "region")
    loc = region_location(default_region) or region_location("us-east-1")
    assert loc is not None
    return ResolvedLocation(Location(lat=loc.lat, lon=loc.lon), "default")


class Allocator:
    def __init__(self, settings: HubSettings, store: FleetStore, board: RoutingBoard, workers: WorkerClient,
                 metrics: HubMetrics, background: BackgroundTasks) -> None:
        self.settings = settings
        self.store = store
        self.board = board
        self.workers = workers
        self.metrics = metrics
        self.background = background
        self._deployments = {d.region: d for d in settings.livekit_deployments}

    # --- create -------------------------------------------------------------------------------------------

    async def create(self, req: SessionRequest, where: ResolvedLocation) -> tuple[SessionConfig, bool]:
        """(config, created). ``created`` is False when the session_key already had a live session."""
        started = time.perf_counter()
        outcome = "error"
        try:
            if req.session_key is None:
                config, _ = await self._place(req, where)
                outcome = "created"
                return config, True
            result = await self._create_with_affinity(req, where, req.session_key)
            outcome = "created" if result[1] else "reused"
            return result
        except NoCapacity:
            outcome = "no_capacity"
            raise
        except SessionPending:
            outcome = "pending"  # the client retries; not a failure of the hub
            raise
        finally:
            self.metrics.allocations.labels(outcome=outcome).inc()
            self.metrics.allocation_seconds.labels(outcome=outcome).observe(time.perf_counter() - started)

    async def _create_with_affinity(self, req: SessionRequest, where: ResolvedLocation,
                                    session_key: str) -> tuple[SessionConfig, bool]:
        claim = f"{_PENDING}{secrets.token_urlsafe(9)}"
        claim_ttl = self.settings.dispatch_timeout_s * self.settings.max_dispatch_attempts + 2.0
        deadline = time.monotonic() + claim_ttl
        delays = backoff_delays(base_s=0.02, cap_s=0.25)  # jittered: waiters on one key do not poll in step
        while True:
            current = await self.store.get_claim(session_key)
            if current is not None and current.startswith(_PENDING):
                # Another request is placing this conversation: wait for its answer rather than take a second slot.
                if time.monotonic() > deadline:
                    raise SessionPending()
                await asyncio.sleep(next(delays))
                continue
            if current is not None:
                live = await self._live_session(current)
                if live is not None:
                    return self._fresh_token_config(current, live.record, req.identity), False
            swapped, _ = await self.store.compare_and_set_claim(session_key, current, claim, claim_ttl)
            if swapped:
                if current is not None:
                    await self._abandon(current)  # its worker is gone: the conversation moves
                break
        try:
            config, worker_url = await self._place(req, where)
        except BaseException:
            await self.store.compare_and_set_claim(session_key, claim, None, 0)
            raise
        try:
            swapped, _ = await self.store.compare_and_set_claim(session_key, claim, config.session_id,
                                                                self.settings.affinity_ttl_s)
        except BaseException:
            # Placed, but the key cannot point at it: no client would ever learn of this session.
            self._spawn_undo(config.worker.id, config.session_id, worker_url)
            raise
        if not swapped:
            # The claim lapsed while a slow store held this placement up, and another request took the key: one
            # session per conversation, so this one goes and the caller, retrying, gets the other.
            self._spawn_undo(config.worker.id, config.session_id, worker_url)
            raise SessionPending()
        return config, True

    async def _live_session(self, session_id: str) -> StoredSession | None:
        worker_id = keys.worker_of_session(session_id)
        if worker_id is None:
            return None
        stored = await self.store.read_session(worker_id, session_id)
        if stored is None or not stored.worker_alive:
            return None
        return stored

    async def _abandon(self, session_id: str) -> None:
        worker_id = keys.worker_of_session(session_id)
        if worker_id is not None:
            released = await self.store.release(worker_id, session_id)
            self.board.note_used(worker_id, released.used)

    async def _place(self, req: SessionRequest, where: ResolvedLocation) -> tuple[SessionConfig, str]:
        """(config, the worker's URL): try the best candidates until one accepts. A reservation refused by the
        script teaches the board, so re-ranking finds the workers that really have room; 503 only once none is left
        (no false rejects)."""
        loc = where.location
        tried: set[str] = set()
        dispatches = reservations = 0
        refreshed = False
        while dispatches < self.settings.max_dispatch_attempts and reservations < _MAX_RESERVATIONS:
            looked = time.monotonic()
            ranked = [r for r in self.board.rank(loc.lat, loc.lon, req.labels) if r.entry.worker_id not in tried]
            if not ranked:
                if refreshed:
                    break
                # A worker may have registered, or slots returned, since the last refresh (maybe via another hub):
                # read the board once more, or share a read that began after this request looked.
                await self.board.refresh(unless_read_since=looked)
                refreshed = True
                continue
            for candidate in ranked:
                tried.add(candidate.entry.worker_id)
                reservations += 1
                placed, dispatched = await self._try(candidate, req, loc)
                if placed is not None:
                    return placed
                dispatches += dispatched
                if dispatched:
                    break  # re-rank: the board has learned from the failure
        raise NoCapacity()

    async def _try(self, candidate: Ranked, req: SessionRequest,
                   loc: Location) -> tuple[tuple[SessionConfig, str] | None, int]:
        """((config, worker URL) or None, 1 if a dispatch was attempted)."""
        entry = candidate.entry
        random_part = secrets.token_urlsafe(12)
        session_id = keys.make_session_id(entry.worker_id, random_part)
        room = f"fleet-{random_part}"
        deployment = choose_deployment(self.settings.livekit_deployments, (loc.lat, loc.lon), (entry.lat, entry.lon))
        participant = mint_participant_token(deployment, room, req.identity or f"user-{random_part[:8]}",
                                             self.settings.livekit_token_ttl_s)
        record: dict[str, Any] = {
            "session_id": session_id, "session_key": req.session_key, "worker_id": entry.worker_id,
            "worker_region": entry.region, "livekit_region": deployment.region, "room": room,
            "created_at": time.time(), "expires_at": participant.expires_at.isoformat(),
            "location": loc.model_dump(),
            "audio_url": (entry.static.get("audio_url") or "").replace("{session_id}", session_id) or None,
        }
        reservation = await self.store.reserve(entry.worker_id, session_id, record)
        if not reservation.ok:
            if reservation.reason == "full":
                self.board.note_used(entry.worker_id, reservation.used, reservation.max_streams)
            else:
                self.board.note_unavailable(entry.worker_id)
            return None, 0
        self.board.note_used(entry.worker_id, reservation.used, reservation.max_streams)
        try:
            agent_token = mint_agent_token(deployment, room, session_id, self.settings.livekit_token_ttl_s)
            dispatched = await self.workers.dispatch(reservation.url, SessionDispatch(
                session_id=session_id, session_key=req.session_key, room=room, livekit_url=deployment.url,
                token=agent_token))
            outcome = dispatched.outcome
            if outcome is DispatchOutcome.ACCEPTED and await self.store.confirm(entry.worker_id, session_id,
                                                                                dispatched.accepted_at_seq):
                config = self._config(session_id, record, token=participant.jwt, expires_at=participant.expires_at)
                return (config, reservation.url), 1
            # Refused, unreachable, timed out, or the pending lease lapsed: free the slot and try the next worker.
            self.metrics.dispatch_failures.labels(reason=outcome.value).inc()
            await self.store.release(entry.worker_id, session_id)
        except BaseException:
            # The store failed mid-step, or the request was cancelled: the worker may run the session, and its next
            # heartbeat would adopt the pending lease (a slot no client knows of). Undo it where this request's
            # failure cannot reach, then fail as before.
            self._spawn_undo(entry.worker_id, session_id, reservation.url)
            raise
        if outcome is DispatchOutcome.FULL:
            self.board.note_used(entry.worker_id, reservation.max_streams)
        else:
            self.board.note_unavailable(entry.worker_id)
        if outcome is not DispatchOutcome.FULL:
            # Unless it said it is full, the worker may hold the session after all (a late answer, a 5xx or a reset
            # after it took it): stop it rather than wait for heartbeat reconciliation. A stop that overtakes its
            # dispatch is remembered by the worker, which then refuses the dispatch.
            self.background.spawn(self.workers.stop(reservation.url, session_id), name=f"stop {session_id}")
        return None, 1

    def _spawn_undo(self, worker_id: str, session_id: str, worker_url: str) -> None:
        self.background.spawn(self._undo(worker_id, session_id, worker_url), name=f"undo {session_id}")

    async def _undo(self, worker_id: str, session_id: str, worker_url: str) -> None:
        """Stop a session on its worker, then release its slot, retrying the store a few times. The stop comes
        first: a session the worker no longer runs loses its lease at the worker's next heartbeat even if the store
        stays down."""
        await self.workers.stop(worker_url, session_id)
        for delay in itertools.islice(backoff_delays(base_s=0.1, cap_s=2.0), _UNDO_ATTEMPTS):
            try:
                released = await self.store.release(worker_id, session_id)
            except StoreUnavailable:
                await asyncio.sleep(delay)
                continue
            self.board.note_used(worker_id, released.used)
            return
        log.warning("could not release %s; the worker was told to stop it, so its next heartbeat frees the slot",
                    session_id)

    def _config(self, session_id: str, record: dict[str, Any], *, token: str | None = None,
                expires_at: datetime | None = None) -> SessionConfig:
        deployment = self._deployment(record)
        return SessionConfig(
            session_id=session_id,
            session_key=record.get("session_key"),
            worker=WorkerRef(id=record["worker_id"], region=record["worker_region"], audio_url=record.get("audio_url")),
            livekit=LiveKitConfig(url=deployment.url, region=deployment.region, room=record["room"], token=token),
            expires_at=expires_at or datetime.fromisoformat(record["expires_at"]),
        )

    def _fresh_token_config(self, session_id: str, record: dict[str, Any], identity: str | None) -> SessionConfig:
        """The same session with a new participant token: affinity never costs a second slot."""
        deployment = self._deployment(record)
        identity = identity or f"user-{session_id.rpartition(keys.SESSION_ID_SEPARATOR)[2][:8]}"
        minted = mint_participant_token(deployment, record["room"], identity, self.settings.livekit_token_ttl_s)
        return self._config(session_id, record, token=minted.jwt, expires_at=minted.expires_at)

    def _deployment(self, record: dict[str, Any]) -> LiveKitDeployment:
        found = self._deployments.get(record["livekit_region"])
        if found is not None:
            return found
        loc = record.get("location") or {"lat": 0.0, "lon": 0.0}
        return choose_deployment(self.settings.livekit_deployments, (loc["lat"], loc["lon"]), (loc["lat"], loc["lon"]))

    # --- read and end -------------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionConfig:
        stored = await self._stored(session_id)
        return self._config(session_id, stored.record)

    async def end(self, session_id: str) -> None:
        worker_id = keys.worker_of_session(session_id)
        if worker_id is None:
            raise SessionNotFound()
        try:
            released = await self.store.release(worker_id, session_id)
        except StoreUnavailable:
            # The release may have run with its answer lost (a cluster does not resend): the caller's retry would
            # find nothing. End it where this request's failure cannot reach, then fail as the store did.
            if (known := self.board.entries.get(worker_id)) is not None:
                self._spawn_undo(worker_id, session_id, known.url)
            raise
        if not released.held or released.record is None:
            raise SessionNotFound()
        self.board.note_used(worker_id, released.used)
        if released.worker_url:
            self.background.spawn(self.workers.stop(released.worker_url, session_id), name=f"stop {session_id}")
        if session_key := released.record.get("session_key"):
            try:
                await self.store.compare_and_set_claim(session_key, session_id, None, 0)
            except StoreUnavailable:
                # The session has ended: the claim left behind points at an ended session, which the next request
                # for the key finds gone and replaces.
                log.info("session %s ended; its session_key claim stays until the next request replaces it",
                         session_id)

    async def _stored(self, session_id: str) -> StoredSession:
        worker_id = keys.worker_of_session(session_id)
        stored = await self.store.read_session(worker_id, session_id) if worker_id else None
        if stored is None:
            raise SessionNotFound()
        return stored
