"""The worker agent: engine → HTTP server → registration → heartbeats, watchers, and a clean drain on SIGTERM.

Drain (SIGTERM/SIGINT, a spot notice or an ASG scale-in): report ``draining`` to the hub at once, refuse new
sessions, wait up to ``drain_timeout_s`` for sessions to end (a spot notice, even one that comes during the drain,
brings the end forward), stop the rest, deregister, complete the ASG lifecycle action if a hook is configured,
and return so the process exits 0. Each closing step runs even when one before it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Coroutine, Iterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from pydantic import ValidationError

from shared.errors import describe_problems
from shared.geo import region_location
from shared.models import Location, WorkerRegistration
from worker.app import create_worker_app
from worker.capacity import compute_capacity
from worker.engine import Engine
from worker.gpus import Gpu, GpuProbeFailed, detect_gpus
from worker.hub_client import HubClient
from worker.hub_errors import describe_error
from worker.imds import Imds, ImdsUnavailable, InstanceIdentity
from worker.lifecycle import Lifecycle
from worker.sessions import SessionManager
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
WATCH_INTERVAL_S = 5.0
#: A spot drain ends this long before the notice's termination time, to stop the rest and deregister.
SPOT_MARGIN_S = 15.0


class CannotStart(Exception):
    """A start the agent refuses, with a one-line reason (the CLI exits 2; systemd starts it again)."""


class CannotListen(CannotStart):
    """The worker's HTTP API cannot bind its host and port: a configuration the start refuses."""


class WorkerAgent:
    def __init__(self, settings: WorkerSettings, engine: Engine | None = None, lifecycle: Lifecycle | None = None,
                 imds: Imds | None = None, install_signals: bool = True) -> None:
        self.settings = settings
        #: Off when the agent runs inside another program (tests) that owns the process's signals.
        self.install_signals = install_signals
        if engine is None:
            from worker.engines import load_engine

            engine = load_engine(settings.engine, settings)
        self.engine = engine
        self.imds = imds or Imds(settings.imds_url, settings.imds_timeout_s)
        self._lifecycle = lifecycle
        self.identity: InstanceIdentity | None = None
        self.gpus: list[Gpu] = []
        self.manager: SessionManager | None = None
        self.hub: HubClient | None = None
        self.server: uvicorn.Server | None = None
        self.port = settings.port
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.drain_reason: str | None = None
        self._drain_deadline: float | None = None  # monotonic time a spot notice leaves the drain, margin taken
        self._drain_changed = asyncio.Event()  # a running drain looks again at its deadline and the force flag
        self._hub_task: asyncio.Task[Any] | None = None

    # --- start ---------------------------------------------------------------------------------------------

    def request_drain(self, reason: str, within_s: float | None = None) -> None:
        """Begin draining (idempotent); safe to call from signal handlers and watchers. ``within_s``: the instance
        ends in this many seconds (a spot instance has two minutes), so the wait for sessions ends ``SPOT_MARGIN_S``
        earlier, below ``drain_timeout_s``, even in a drain already running."""
        if within_s is not None:
            deadline = time.monotonic() + within_s - SPOT_MARGIN_S
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
                if self.drain_reason is not None:
                    log.warning("%s during the drain: sessions get %.0f s more at most", reason,
                                max(0.0, within_s - SPOT_MARGIN_S))
        if self.drain_reason is None:
            self.drain_reason = reason
            log.info("drain requested: %s", reason)
        elif reason in ("SIGTERM", "SIGINT"):
            log.warning("second %s: stopping sessions now instead of waiting", reason)
            self._force.set()
        if self.manager is not None:
            self.manager.set_draining(True)
        self._drain_changed.set()
        self._stop.set()

    def _bind_port(self) -> socket.socket:
        """Bind before registering so the advertised URL is right even with port 0."""
        host, port = self.settings.host, self.settings.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            variable = "FLEET_PORT" if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "FLEET_HOST"
            raise CannotListen(f"{variable}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = sock.getsockname()[1]
        return sock

    def _registration(self, max_streams: int) -> WorkerRegistration:
        s, ident = self.settings, self.identity
        worker_id = s.worker_id or (ident.instance_id if ident else None) or s.fallback_worker_id(self.port)
        region = s.region or (ident.region if ident else None) or DEFAULT_REGION
        url = s.advertise_url or default_advertise_url(s.host, self.port, ident.local_ipv4 if ident else None)
        location = None
        if s.location_lat is not None and s.location_lon is not None:
            location = Location(lat=s.location_lat, lon=s.location_lon)
        elif region_location(region) is None:  # the hub would refuse the registration
            raise CannotStart(f"region {region} has no known coordinates: set FLEET_LOCATION_LAT and "
                              f"FLEET_LOCATION_LON")
        try:
            return WorkerRegistration(
                worker_id=worker_id, url=url, region=region, zone=s.zone or (ident.zone if ident else None),
                location=location, max_streams=max_streams, gpus=[g.info() for g in self.gpus],
                instance_type=ident.instance_type if ident else None, labels=s.labels, engine=self.engine.name,
                audio_url=client_audio_url(s.public_url or url, getattr(self.engine, "client_audio_path", None)),
            )
        except ValidationError as exc:  # a value read from the machine or IMDS: the settings were checked already
            errors = exc.errors(include_url=False, include_input=False)
            problems = describe_problems(errors)
            hint = f" ({url}; set FLEET_ADVERTISE_URL)" if any(e["loc"][:1] == ("url",) for e in errors) else ""
            raise CannotStart(f"invalid registration: {problems}{hint}") from None

    async def run(self) -> int:
        """Run until drained; returns the exit code. Whatever fails, what it started is closed."""
        tasks: list[asyncio.Task[Any]] = []
        try:
            await self._start(tasks)
            await self._stop.wait()
            await self._drain()
        finally:
            await self._close(tasks)
        return 0

    async def _close(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Stop the tasks and close what was opened, each step on its own: one that fails is logged and the next
        still runs (a failing engine must not leave the lifecycle hook uncompleted)."""
        if self.server is not None:
            self.server.should_exit = True
        for task in tasks:
            if task.get_name() != "http":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _step("closing the engine", self.engine.aclose())
        if self.hub is not None:
            await _step("closing the hub client", self.hub.aclose())
        await _step("closing the IMDS client", self.imds.aclose())
        if self.install_signals:
            self._remove_signals()
        if self._lifecycle is not None and self.settings.lifecycle_hook_name and self.drain_reason is not None:
            # Even when the drain went wrong: the instance is leaving either way, and an uncompleted hook
            # keeps the ASG waiting for its timeout.
            await _step("completing the lifecycle action", asyncio.to_thread(self._lifecycle.complete, "CONTINUE"))

    async def _start(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Engine, HTTP server, then registration and heartbeats and the watchers, as tasks added to ``tasks``."""
        s = self.settings
        try:
            self.identity = await self.imds.identity(required=s.expects_ec2)
        except ImdsUnavailable as exc:
            raise CannotStart(f"configured for EC2 (a lifecycle hook or scale-in protection) but the instance "
                              f"metadata did not answer: {exc}") from None
        try:
            self.gpus = await asyncio.to_thread(detect_gpus, s.simulate_gpu)
        except GpuProbeFailed as exc:
            raise CannotStart(f"cannot read the GPUs: {exc}") from None
        cap = compute_capacity(self.gpus, self.engine.profile, override=s.max_streams)
        log.info("GPUs: %s; capacity %d streams (limited by %s)",
                 [g.name for g in self.gpus] or "none (CPU mode)", cap.max_streams, cap.reason)
        await self.engine.start()
        self.manager = SessionManager(self.engine, cap.max_streams)
        sock = self._bind_port()
        registration = self._registration(cap.max_streams)
        token = s.worker_token.get_secret_value()
        app = create_worker_app(self.manager, token, lambda: self.status(registration))
        self.server = _AgentServer(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.hub = HubClient(s.hub_urls, token, registration, self.manager, self.gpus, timeout_s=s.hub_timeout_s,
                             backoff_cap_s=s.register_backoff_cap_s, use_channel=s.heartbeat_channel)
        lifecycle = self._lifecycle
        if lifecycle is None and self.identity is not None and (s.lifecycle_hook_name or s.protect_from_scale_in):
            lifecycle = Lifecycle.from_settings(s, self.identity, await self.imds.autoscaling_group())
        self._lifecycle = lifecycle
        if lifecycle is not None and s.protect_from_scale_in:
            self.manager.on_change = lifecycle.sessions_changed
        if self.install_signals:
            self._install_signals()
        tasks.append(self._spawn(self.server.serve(sockets=[sock]), "http"))
        while not self.server.started:  # uvicorn exposes a flag, not an event
            if tasks[0].done():
                raise RuntimeError("the worker's HTTP server failed to start")
            await asyncio.sleep(0.01)
        self._hub_task = self._spawn(self._register_then_heartbeat(), "hub")
        tasks.append(self._hub_task)
        if self.identity is not None:
            tasks.append(self._spawn(self._watch_ec2(), "ec2-watch"))
        if lifecycle is not None and s.protect_from_scale_in:
            tasks.append(self._spawn(lifecycle.protection_loop(), "scale-in-protection"))

    async def _wait_for_sessions(self) -> str | None:
        """Wait for the sessions to end; None when they did, else what ended the drain while some still run (for the
        log, which an operator reads to learn whether the sessions were given their time): a second signal,
        ``drain_timeout_s``, or a spot notice's deadline (one that comes while waiting brings the end forward)."""
        assert self.manager is not None
        timeout_at = time.monotonic() + self.settings.drain_timeout_s
        while True:
            self._drain_changed.clear()  # before reading what it guards: a change from now on wakes us again
            if self._force.is_set():
                return "drain cut short by a second signal" if self.manager.sessions else None
            end, why = timeout_at, f"drain timeout after {self.settings.drain_timeout_s:g} s"
            if self._drain_deadline is not None and self._drain_deadline < timeout_at:
                end, why = self._drain_deadline, "spot interruption deadline reached"
            waiting = asyncio.create_task(self.manager.wait_empty(max(0.0, end - time.monotonic())))
            changed = asyncio.create_task(self._drain_changed.wait())
            await asyncio.wait({waiting, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if waiting.done():
                return None if waiting.result() else why
            waiting.cancel()

    async def _unless_forced(self, work: Awaitable[Any], timeout_s: float, what: str) -> None:
        """Await ``work`` for up to ``timeout_s``, less if a second signal comes; a failure is logged."""
        task = asyncio.ensure_future(work)
        forced = asyncio.create_task(self._force.wait())
        done, _ = await asyncio.wait({task, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if task not in done:
            task.cancel()
            log.warning("%s %s; going on without it", what, "cut short" if self._force.is_set() else
                        f"took more than {timeout_s:.1f}s")
        failure = (await asyncio.gather(task, return_exceptions=True))[0]
        if isinstance(failure, Exception):
            log.warning("%s failed: %s", what, describe_error(failure))

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_failure)
        return task

    async def _register_then_heartbeat(self) -> None:
        assert self.hub is not None
        await self.hub.register()
        await self.hub.heartbeat_loop()

    def status(self, registration: WorkerRegistration) -> dict[str, Any]:
        """Who this worker is, and whether a hub holds its registration right now (not while it registers again)."""
        hub = self.hub.describe() if self.hub is not None else {"registered": False}
        return {"worker_id": registration.worker_id, "url": registration.url, "region": registration.region, **hub}

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_drain, sig.name)

    def _remove_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    async def _watch_ec2(self) -> None:
        """Spot interruption and ASG scale-in (or an SRE's Standby/Detach) reach the instance through IMDS: start
        draining early. A drain goes on watching for a spot notice, which may leave it less time than it has. A
        failed look is logged and retried; the watch ends with a spot notice, or with the agent."""
        while True:
            try:
                if await self._look_at_ec2():
                    return
            except Exception:
                log.exception("watching EC2 for interruptions failed; trying again")
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _look_at_ec2(self) -> bool:
        """One look at the spot notice and, until a drain starts, the ASG's target state; True after a spot notice
        (there is nothing more to learn)."""
        notice = await self.imds.spot_action()
        if notice:
            self.request_drain(f"spot interruption notice: {notice}", within_s=_seconds_until(notice.get("time")))
            return True
        if self.drain_reason is None:
            state = await self.imds.target_lifecycle_state()
            if state and state != "InService" and not state.startswith("Warmed"):
                self.request_drain(f"ASG target lifecycle state {state}")
        return False

    async def _drain(self) -> None:
        """Report draining at once, wait for sessions, stop the rest, deregister."""
        assert self.manager is not None and self.hub is not None
        self.manager.set_draining(True)
        if self.hub.registered.is_set():
            # The hub stops routing to us now, not at the next beat; but a hub that does not answer (or a second
            # signal) must not hold the drain.
            await self._unless_forced(self.hub.heartbeat_once(), self.settings.hub_timeout_s, "the drain's heartbeat")
        why = await self._wait_for_sessions()
        if why is not None:
            log.warning("%s: stopping %d sessions", why, len(self.manager.sessions))
        await self.manager.stop_all()
        if self._hub_task is not None:
            # A heartbeat after deregistration would get 404 and register us again. The task may have failed
            # already (its failure was logged): gather, so its exception does not end the drain here.
            self._hub_task.cancel()
            await asyncio.gather(self._hub_task, return_exceptions=True)
        if self.hub.registered.is_set():
            with contextlib.suppress(Exception):
                await self.hub.deregister()


class _AgentServer(uvicorn.Server):
    """uvicorn would take over SIGTERM/SIGINT and re-raise them on exit; the agent drains on them instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _step(what: str, work: Awaitable[Any]) -> None:
    """One step of closing down: a failure is logged, never raised, so the steps after it still run."""
    try:
        await work
    except Exception:
        log.exception("%s failed; closing down goes on", what)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def _seconds_until(timestamp: str | None) -> float | None:
    """Seconds from now until an IMDS timestamp (``2026-11-23T08:22:00Z``); None when there is none to read."""
    if not timestamp:
        return None
    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def default_advertise_url(bound_host: str, port: int, private_ip: str | None = None) -> str:
    """Where hubs reach a worker without FLEET_ADVERTISE_URL: its EC2 private IP, else the host it binds, or the
    machine's name when it binds every interface (an address that says nothing of where the worker is)."""
    host = private_ip or bound_host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if not host or (address is not None and address.is_unspecified):
        host, address = socket.gethostname(), None
    if address is not None and address.version == 6:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def client_audio_url(base: str, path: str | None) -> str | None:
    """The WebSocket form of ``base`` + the engine's audio path: http(s) becomes ws(s)."""
    if path is None:
        return None
    return "ws" + base.rstrip("/").removeprefix("http") + path
