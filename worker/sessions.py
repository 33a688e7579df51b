"""The sessions this worker runs: local capacity, draining, and the engine calls, under one lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.keys import shown_session_id
from shared.models import SessionDispatch, WorkerSessionInfo
from worker.engine import Engine

log = logging.getLogger(__name__)

#: How long, and how many, sessions that ended or were stopped here are remembered: a dispatch of one is refused. A
#: hub that gave up on a dispatch (a timeout, a failed store) stops the session at once, and that stop can overtake
#: the dispatch it undoes; a dispatch replayed after its session ended would start a session no hub counts.
STOP_REMEMBERED_S = 60.0
STOPS_REMEMBERED = 4096


class SessionRefused(Exception):
    """A dispatch the worker cannot take: ``code`` says why (full, draining, duplicate, stopped, engine_error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: ``worker_dispatches_total`` outcomes: accepted, or the code of the refusal (docs/metrics.md).
DISPATCH_OUTCOMES = ("accepted", "full", "draining", "duplicate", "stopped", "engine_error")
#: ``worker_heartbeats_total`` outcomes: answered, the hub had forgotten the worker, or not delivered.
HEARTBEAT_OUTCOMES = ("ok", "forgotten", "failed")


class Metrics:
    """Prometheus metrics on a registry of their own, so several workers can live in one test process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge("worker_sessions_active", "Sessions running", registry=self.registry)
        self.max_streams = Gauge("worker_max_streams", "Stream capacity", registry=self.registry)
        self.draining = Gauge("worker_draining", "1 while draining", registry=self.registry)
        self.dispatches = Counter("worker_dispatches_total", "Dispatches by outcome", ["outcome"],
                                  registry=self.registry)
        self.engine_latency = Gauge("worker_engine_latency_ms", "Engine latency reported in heartbeats",
                                    registry=self.registry)
        self.engine_stage_latency = Gauge("worker_engine_stage_latency_ms",
                                          "Recent mean latency per pipeline stage (engines that have stages)",
                                          ["stage"], registry=self.registry)
        self.start_seconds = Histogram("worker_session_start_seconds", "Time to start a session",
                                       registry=self.registry)
        self.heartbeats = Counter("worker_heartbeats_total", "Heartbeats by outcome", ["outcome"],
                                  registry=self.registry)
        self.engine_turn_errors = Counter("worker_engine_turn_errors_total",
                                          "Conversation turns that failed, by the stage that failed them (engines "
                                          "that have turns)", ["stage"], registry=self.registry)
        self._turn_errors_counted: dict[str, int] = {}
        # Known label values start at zero so rate() and alerts work before the first event (as the hub's do).
        for outcome in DISPATCH_OUTCOMES:
            self.dispatches.labels(outcome)
        for outcome in HEARTBEAT_OUTCOMES:
            self.heartbeats.labels(outcome)

    def observe(self, engine: Engine) -> None:
        """Scrape-time figures from the engine: its latency, and each stage's latency and failed turns for engines that
        have stages."""
        self.engine_latency.set(engine.stats().latency_ms)
        stages: dict[str, float] = getattr(engine, "stage_latency_ms", None) or {}
        for stage, ms in stages.items():
            self.engine_stage_latency.labels(stage=stage).set(ms)
        # Engines with turns count their failed ones themselves; the counter catches up with them here.
        failed: dict[str, int] = getattr(engine, "turn_errors", None) or {}
        for stage, count in failed.items():
            counter = self.engine_turn_errors.labels(stage=stage)
            if count > self._turn_errors_counted.get(stage, 0):
                counter.inc(count - self._turn_errors_counted.get(stage, 0))
                self._turn_errors_counted[stage] = count


class SessionManager:
    def __init__(self, engine: Engine, max_streams: int, metrics: Metrics | None = None) -> None:
        self.heartbeat_seq = 0
        self.engine = engine
        self.max_streams = max_streams
        self.metrics = metrics or Metrics()
        self.metrics.max_streams.set(max_streams)
        self.sessions: dict[str, WorkerSessionInfo] = {}
        self._ended_recently: dict[str, float] = {}  # session id -> until when (monotonic) a dispatch of it is refused
        self._leaving = False  # the worker's own drain (SIGTERM, a spot notice, scale-in): it will exit
        self._drained_by_hub = False  # an SRE drained it through the hub; a resume there lifts it
        # Held across the engine's start so concurrent dispatches cannot overbook a slot.
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        #: Set when a session ends on its own after the last heartbeat's snapshot: the hub still counts it.
        self.ended_unreported = asyncio.Event()
        self._engine_stops: set[asyncio.Task[None]] = set()  # engine stops under way; see begin_stop
        #: Called after every change of the session count (scale-in protection listens here).
        self.on_change: Callable[[int], None] | None = None

    @property
    def draining(self) -> bool:
        """New sessions are refused, for either reason."""
        return self._leaving or self._drained_by_hub

    @property
    def leaving(self) -> bool:
        """The worker drains on its own account and will exit; this is the state its heartbeats report."""
        return self._leaving

    @property
    def drained_by_hub(self) -> bool:
        """An SRE drained the worker through the hub, and no resume has reached it yet."""
        return self._drained_by_hub

    def set_draining(self, value: bool) -> None:
        """The worker's own drain (the agent's signal handlers and EC2 watchers)."""
        was = self.draining
        self._leaving = value
        self._log_change(was)

    def set_drained_by_hub(self, value: bool) -> None:
        """Follow the state the hub holds: an SRE's drain, then its resume."""
        was = self.draining
        self._drained_by_hub = value
        self._log_change(was)

    def _log_change(self, was: bool) -> None:
        if self.draining != was:
            log.info("worker %s", "draining: no new sessions" if self.draining else "ready again")
        self.metrics.draining.set(1 if self.draining else 0)

    def ids(self) -> list[str]:
        return list(self.sessions)

    def snapshot(self) -> tuple[int, list[str]]:
        """The next heartbeat's number and the sessions it reports. A session taken after this call reports the
        number as its ``accepted_at_seq``, so the hub can tell a heartbeat that predates it from one that does not."""
        self.heartbeat_seq += 1
        self.ended_unreported.clear()
        return self.heartbeat_seq, self.ids()

    def _notify(self) -> None:
        self.metrics.sessions_active.set(len(self.sessions))
        self._wake()
        if self.on_change is not None:
            self.on_change(len(self.sessions))

    def _wake(self) -> None:
        """Whoever waits for a change (``wait_empty``) looks again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def start(self, spec: SessionDispatch) -> WorkerSessionInfo:
        try:
            return await self._start(spec)
        finally:
            self._wake()  # a start that ended without a session ends a drain's wait for it too

    async def _start(self, spec: SessionDispatch) -> WorkerSessionInfo:
        async with self._lock:
            if self.draining:
                self._refuse("draining", "worker is draining")
            if spec.session_id in self.sessions:
                self._refuse("duplicate", f"session {spec.session_id} already runs here")
            if len(self.sessions) >= self.max_streams:
                self._refuse("full", f"all {self.max_streams} streams in use")
            if self._remembers(spec.session_id):
                self._refuse_stopped(spec.session_id)
            started = time.perf_counter()
            try:
                await self.engine.start_session(spec, self._ended)
            except Exception as exc:  # noqa: BLE001 - any engine failure refuses this one session
                log.warning("engine refused session %s: %s", shown_session_id(spec.session_id), exc)
                self._refuse("engine_error", f"engine could not start the session: {exc}")
            self.metrics.start_seconds.observe(time.perf_counter() - started)
            if self._remembers(spec.session_id):  # stopped (or ended) while the engine started it
                await self._stop_in_engine(spec.session_id)
                self._refuse_stopped(spec.session_id)
            info = WorkerSessionInfo(session_id=spec.session_id, session_key=spec.session_key, room=spec.room,
                                     started_at=time.time(), accepted_at_seq=self.heartbeat_seq)
            self.sessions[spec.session_id] = info
            self.metrics.dispatches.labels("accepted").inc()
            log.info("session %s started (room %s); %d of %d streams in use", shown_session_id(spec.session_id),
                     spec.room, len(self.sessions), self.max_streams)
            self._notify()
            return info

    def _refuse(self, code: str, message: str) -> None:
        self.metrics.dispatches.labels(code).inc()
        raise SessionRefused(code, message)

    def _remembers(self, session_id: str) -> bool:
        """The session ended or was stopped here lately. Still remembered after a refusal: a replay may come twice."""
        return self._ended_recently.get(session_id, 0.0) > time.monotonic()

    def _refuse_stopped(self, session_id: str) -> None:
        self._refuse("stopped", f"session {session_id} was stopped or has ended here")

    def _remember_stop(self, session_id: str) -> None:
        now = time.monotonic()
        self._ended_recently.pop(session_id, None)  # remembered again: it moves to the newest end
        while self._ended_recently:  # oldest first: drop the lapsed and the surplus, looking at no more than those
            sid, until = next(iter(self._ended_recently.items()))
            if until > now and len(self._ended_recently) < STOPS_REMEMBERED:
                break
            del self._ended_recently[sid]
        self._ended_recently[session_id] = now + STOP_REMEMBERED_S

    def _ended(self, session_id: str, reason: str) -> None:
        """Engine callback: a session ended by itself; the next heartbeat, sent soon, no longer reports it."""
        self._remember_stop(session_id)
        if self.sessions.pop(session_id, None) is not None:
            log.info("session %s ended: %s", shown_session_id(session_id), reason)
            self.ended_unreported.set()
            self._notify()

    def begin_stop(self, session_id: str) -> asyncio.Task[None] | None:
        """Stop a session without waiting for the engine: it leaves the count at once, and the engine's stop runs in
        a task of its own that no caller's cancellation cuts short (the engine must not keep running a session the
        worker no longer counts); ``stop_all`` waits for it. None when the session does not run here. Either way a
        dispatch of it that comes later (or is being started) is refused. An engine that fails to stop it is
        logged: the slot is free either way, as the hub already believes."""
        self._remember_stop(session_id)
        if self.sessions.pop(session_id, None) is None:
            return None
        log.info("session %s stopped; %d of %d streams in use", shown_session_id(session_id), len(self.sessions),
                 self.max_streams)
        stopping = asyncio.create_task(self._stop_in_engine(session_id), name=f"stopping session {session_id}")
        self._engine_stops.add(stopping)
        stopping.add_done_callback(self._engine_stops.discard)
        stopping.add_done_callback(lambda _: self._notify())
        return stopping

    async def stop(self, session_id: str) -> bool:
        """Stop a session and wait for the engine (see ``begin_stop``); False when it does not run here."""
        stopping = self.begin_stop(session_id)
        if stopping is None:
            return False
        await asyncio.shield(stopping)
        return True

    async def _stop_in_engine(self, session_id: str) -> None:
        try:
            await self.engine.stop_session(session_id)
        except Exception:
            log.exception("the engine failed to stop session %s", shown_session_id(session_id))

    async def stop_all(self) -> None:
        """Stop every session and wait for every engine stop under way, those a hub's answer began included: the
        engine closes after this. Cancelling the wait leaves the stops running."""
        for session_id in self.ids():
            self.begin_stop(session_id)
        if self._engine_stops:
            await asyncio.wait(set(self._engine_stops))

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no session runs or is being started, up to ``timeout_s``; True if it emptied. A drain waits
        here: a session the engine is still starting is answered 201 once started, so it counts as running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.sessions or self._lock.locked():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):  # unlike wait_for, never loses a cancellation
                    await self._changed.wait()
        return True
