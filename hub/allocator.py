"""Placing a session: affinity, ranking, atomic reservation, dispatch, then confirmation or release."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from hub.board import Ranked, RoutingBoard
from hub.dispatch import DispatchOutcome, StopAnswer, WorkerClient
from hub.livekit import choose_deployment, mint_agent_token, mint_participant_token
from hub.metrics import HubMetrics
from hub.placement import first_to_accept
from hub.settings import HubSettings, LiveKitDeployment
from hub.store import FleetStore, StoredSession
from hub.tasks import BackgroundTasks
from shared import keys
from shared.backoff import backoff_delays
from shared.errors import (
    NoCapacity,
    NoMatchingWorker,
    SessionKeyInUse,
    SessionNotFound,
    SessionPending,
    StoreUnavailable,
)
from shared.geo import AWS_REGIONS
from shared.models import LiveKitConfig, Location, SessionConfig, SessionDispatch, SessionRequest, WorkerRef

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_PENDING = "pending:"
#: LiveKit room names: this prefix, then 96 random bits in hex (a name of letters and digits only).
ROOM_PREFIX = "fleet-"
#: How long an undo keeps trying to reach the store and the worker: longer than a Redis failover takes.
_UNDO_WINDOW_S = 120.0
#: How long ending a session waits for its worker's answer to the stop before freeing the slot anyway. The stop
#: usually lands in a millisecond; this bounds what a slow or vanished worker adds to a DELETE.
_STOP_BEFORE_RELEASE_S = 1.0


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
    # Both names are known: the request's model and the settings refuse a region with no coordinates.
    if region is not None:
        loc = AWS_REGIONS[region]
        return ResolvedLocation(Location(lat=loc.lat, lon=loc.lon), "region")
    loc = AWS_REGIONS[default_region]
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
        self._undoing: set[str] = set()  # sessions this hub is ending because no client can learn of them

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
        except NoMatchingWorker:
            outcome = "no_matching_worker"
            raise
        except SessionPending:
            outcome = "pending"  # the client retries; not a failure of the hub
            raise
        except SessionKeyInUse:
            outcome = "conflict"
            raise
        finally:
            self.metrics.count_allocation(outcome, started)

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
                if current is not None and current not in self._undoing:  # an undo releases its own
                    try:
                        await self._abandon(current)  # its worker is gone: the conversation moves
                    except BaseException:
                        # Not left pending: the client's retry would wait out the claim for nothing.
                        with contextlib.suppress(StoreUnavailable):
                            await self.store.compare_and_set_claim(session_key, claim, current, claim_ttl)
                        raise
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
            # Placed, but the key cannot point at it: no client would ever learn of this session. (The write may have
            # landed with its answer lost, so the undo clears the claim too; or not, so it clears the pending one.)
            self._spawn_undo(config.worker.id, config.session_id, worker_url, session_key, claim)
            raise
        if not swapped:
            # The claim lapsed while a slow store held this placement up, and another request took the key: one
            # session per conversation, so this one goes and the caller, retrying, gets the other.
            self._spawn_undo(config.worker.id, config.session_id, worker_url)
            raise SessionPending()
        return config, True

    async def _live_session(self, session_id: str) -> StoredSession | None:
        worker_id = keys.worker_of_session(session_id)
        if worker_id is None or session_id in self._undoing:
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
        """(config, the worker's URL) from the best candidate that accepts (``hub.placement``)."""
        loc = where.location
        return await first_to_accept(self.board, loc.lat, loc.lon, req.labels,
                                     lambda candidate: self._try(candidate, req, loc),
                                     lambda looked: self.board.refresh(unless_read_since=looked),
                                     max_dispatches=self.settings.max_dispatch_attempts)

    async def _try(self, candidate: Ranked, req: SessionRequest,
                   loc: Location) -> tuple[tuple[SessionConfig, str] | None, bool]:
        """((config, worker URL) or None, whether a dispatch was attempted)."""
        entry = candidate.entry
        # The session id reads and ends the session, so nothing a room's participants see is derived from it: the
        # room's name is drawn apart, and the agent is named after the room (mint_agent_token).
        session_id = keys.make_session_id(entry.worker_id, secrets.token_urlsafe(12))
        room = f"{ROOM_PREFIX}{secrets.token_hex(12)}"
        deployment = choose_deployment(self.settings.livekit_deployments, (loc.lat, loc.lon), (entry.lat, entry.lon))
        identity = req.identity or _default_identity(room)
        participant = mint_participant_token(deployment, room, identity, self.settings.livekit_token_ttl_s)
        record: dict[str, Any] = {
            "session_id": session_id, "session_key": req.session_key, "identity": identity,
            "worker_id": entry.worker_id, "worker_region": entry.region, "livekit_region": deployment.region,
            "room": room,
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
            return None, False
        self.board.note_used(entry.worker_id, reservation.used, reservation.max_streams)
        try:
            agent_token = mint_agent_token(deployment, room, self.settings.livekit_token_ttl_s)
            # Without the session_key: it joins the conversation as its owner, and the agent has no use for it,
            # so no worker (nor a fleet-token holder reading a worker's GET /sessions) is given it.
            dispatched = await self.workers.dispatch(reservation.url, SessionDispatch(
                session_id=session_id, room=room, livekit_url=deployment.url, token=agent_token))
            outcome = dispatched.outcome
            if outcome is DispatchOutcome.ACCEPTED:
                self.board.note_dispatched(entry.worker_id)
            if outcome is DispatchOutcome.ACCEPTED and await self.store.confirm(entry.worker_id, session_id,
                                                                                dispatched.accepted_at_seq):
                config = self._config(session_id, record, token=participant.jwt, expires_at=participant.expires_at)
                return (config, reservation.url), True
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
            if outcome is DispatchOutcome.ACCEPTED:  # but its pending lease had lapsed: the worker itself is fine
                self.board.note_unavailable(entry.worker_id)
            else:
                self.board.note_failed_dispatch(entry.worker_id, outcome.value)
            # Unless it said it is full, the worker may hold the session after all (a late answer, a 5xx or a reset
            # after it took it): stop it rather than wait for heartbeat reconciliation. A stop that overtakes its
            # dispatch is remembered by the worker, which then refuses the dispatch.
            self.background.spawn(self.workers.stop(reservation.url, session_id), name=f"stop {session_id}")
        return None, True

    def _spawn_undo(self, worker_id: str, session_id: str, worker_url: str, session_key: str | None = None,
                    pending_claim: str | None = None) -> None:
        self._undoing.add(session_id)  # from now on, no retry of this conversation is handed this session
        self.background.spawn(self._undo(worker_id, session_id, worker_url, session_key, pending_claim),
                              name=f"undo {session_id}")

    async def _undo(self, worker_id: str, session_id: str, worker_url: str, session_key: str | None,
                    pending_claim: str | None = None) -> None:
        """End a session no client can learn of: stop it on its worker, release its slot and, with ``session_key``,
        the claim that may point at it. The stop comes first: a session the worker no longer runs loses its lease at
        the worker's next heartbeat even if the store stays down; a released one is stopped by the worker's next
        heartbeat even if the worker does not answer now. Either is enough, so each is retried (for as long as a
        Redis failover takes) until it lands: a lease the worker keeps reporting is renewed for good."""
        try:
            stopped = (await self.workers.stop(worker_url, session_id)).delivered
            if not stopped:
                self.background.spawn(self._stop_until_delivered(worker_url, session_id), name=f"stop {session_id}")
            released = await self._until_the_store_answers(lambda: self.store.release(worker_id, session_id))
            if released is not None:
                self.board.note_used(worker_id, released.used)
            if session_key is not None:
                await self._until_the_store_answers(
                    lambda: self.store.compare_and_set_claim(session_key, session_id, None, 0))
                if pending_claim is not None:  # else the client's retry would wait it out for nothing
                    await self._until_the_store_answers(
                        lambda: self.store.compare_and_set_claim(session_key, pending_claim, None, 0))
            if released is None:
                log.warning("could not release %s within %.0f s; %s", keys.shown_session_id(session_id), _UNDO_WINDOW_S,
                            "its worker stopped it, so its next heartbeat frees the slot" if stopped
                            else "its worker is still being told to stop it")
        finally:
            self._undoing.discard(session_id)

    async def _until_the_store_answers(self, step: Callable[[], Awaitable[_T]]) -> _T | None:
        """``step``'s result, retried with backoff while the store is unavailable; None after ``_UNDO_WINDOW_S``."""
        deadline = time.monotonic() + _UNDO_WINDOW_S
        delays = backoff_delays(base_s=0.1, cap_s=5.0)
        while True:
            try:
                return await step()
            except StoreUnavailable:
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    return None
                await asyncio.sleep(delay)

    async def _stop_until_delivered(self, worker_url: str, session_id: str) -> None:
        deadline = time.monotonic() + _UNDO_WINDOW_S
        for delay in backoff_delays(base_s=0.5, cap_s=10.0):
            if time.monotonic() + delay > deadline:
                log.warning("could not tell %s to stop %s within %.0f s", worker_url, keys.shown_session_id(session_id),
                            _UNDO_WINDOW_S)
                return
            await asyncio.sleep(delay)
            if (await self.workers.stop(worker_url, session_id)).delivered:
                return

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
        """The same session with a new participant token, for the participant it was made for: affinity never costs
        a second slot, and a request naming another identity is refused rather than let into the conversation."""
        owner = record.get("identity")  # None: made by a hub from before identities were recorded
        if identity is not None and owner is not None and identity != owner:
            raise SessionKeyInUse()
        deployment = self._deployment(record)
        room = record["room"]
        minted = mint_participant_token(deployment, room, owner or identity or _default_identity(room),
                                        self.settings.livekit_token_ttl_s)
        return self._config(session_id, record, token=minted.jwt, expires_at=minted.expires_at)

    def _deployment(self, record: dict[str, Any]) -> LiveKitDeployment:
        found = self._deployments.get(record["livekit_region"])
        if found is not None:
            return found
        loc = record.get("location") or {"lat": 0.0, "lon": 0.0}
        return choose_deployment(self.settings.livekit_deployments, (loc["lat"], loc["lon"]), (loc["lat"], loc["lon"]))

    # --- read and end -------------------------------------------------------------------------------------

    async def get(self, session_id: str) -> SessionConfig:
        """The session without its token and without its ``session_key``: the key joins the conversation as its
        owner, and the session id, which ends it, must not be worth more than that."""
        stored = await self._stored(session_id)
        return self._config(session_id, stored.record).model_copy(update={"session_key": None})

    async def end(self, session_id: str) -> None:
        """Stop the session on its worker, then free its slot. In that order: a slot freed first could be handed to
        the next session while the worker still runs this one, and the worker would refuse it as full. The wait for
        the worker is bounded (``_STOP_BEFORE_RELEASE_S``); a stop still on its way then finishes in the background,
        and a worker that never hears it is told by its next heartbeat's answer."""
        worker_id = keys.worker_of_session(session_id)
        # Anyone may call this route, unauthenticated: an id the hub does not hold must not reach a worker (each
        # DELETE of a made-up id was relayed to the GPU host the id names, with the fleet token, unthrottled).
        if worker_id is None or not await self.store.holds_session(worker_id, session_id):
            raise SessionNotFound()
        stopping = None
        if (known := self.board.entries.get(worker_id)) is not None:
            stopping = self.background.spawn(self.workers.stop(known.url, session_id), name=f"stop {session_id}")
            await asyncio.wait((stopping,), timeout=_STOP_BEFORE_RELEASE_S)
        try:
            released = await self.store.release(worker_id, session_id)
        except StoreUnavailable:
            # The release may have run with its answer lost (a cluster does not resend): the caller's retry would
            # find nothing. End it where this request's failure cannot reach, then fail as the store did.
            if known is not None:
                self._spawn_undo(worker_id, session_id, known.url)
            raise
        if not released.held or released.record is None:
            # Not held, unless the worker ran it until this request stopped it: its heartbeat freed the slot between
            # the stop and the release.
            if stopping is not None and await stopping is StopAnswer.STOPPED:
                return
            raise SessionNotFound()
        self.board.note_used(worker_id, released.used)
        if released.worker_url and (known is None or known.url != released.worker_url):
            self.background.spawn(self.workers.stop(released.worker_url, session_id), name=f"stop {session_id}")
        if session_key := released.record.get("session_key"):
            try:
                await self.store.compare_and_set_claim(session_key, session_id, None, 0)
            except StoreUnavailable:
                # The session has ended: the claim left behind points at an ended session, which the next request
                # for the key finds gone and replaces.
                log.info("session %s ended; its session_key claim stays until the next request replaces it",
                         keys.shown_session_id(session_id))

    async def _stored(self, session_id: str) -> StoredSession:
        worker_id = keys.worker_of_session(session_id)
        stored = await self.store.read_session(worker_id, session_id) if worker_id else None
        if stored is None:
            raise SessionNotFound()
        return stored


def _default_identity(room: str) -> str:
    """The participant identity of a user who gave none: the same for every token of one session, and, like the
    agent's, named after the room rather than the session id."""
    return f"user-{room.removeprefix(ROOM_PREFIX)[:8]}"
