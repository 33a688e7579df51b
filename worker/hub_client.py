"""Talks to the hubs: register with backoff across FLEET_HUB_URLS, heartbeat, re-register, deregister.

Failures never stop the worker serving its sessions: a heartbeat or registration that fails on one hub goes to the
next at once (every hub shares the registry), the hub that just failed last; when every hub fails, it is logged and
retried with capped exponential backoff and jitter. A hub that forgot the worker (404) or refuses its secret (403)
gets a new registration, and the next heartbeat re-announces the sessions still running.

Heartbeats go over the heartbeat channel (``heartbeat_channel.py``), a WebSocket kept open to the hub, and are
POSTed when it cannot carry them. The settings refuse a hub URL with credentials; one handed to ``HubClient``
directly is still shown without them in logs and ``describe()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import psutil
from pydantic import ValidationError

from shared.auth import new_secret
from shared.backoff import backoff_delays
from shared.keys import shown_session_id
from shared.models import Heartbeat, HeartbeatReply, RegistrationAccepted, WorkerRegistration, WorkerState
from worker import gpus as gpu_probe
from worker.gpus import Gpu
from worker.heartbeat_channel import Delivery, HeartbeatChannel
from worker.hub_errors import HubUnavailable, WorkerForgotten, describe_error
from worker.sessions import SessionManager

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A registration refused the same way again and again (a wrong worker token, an id still held) is logged in full the
#: first time, then at most once in this many seconds while it lasts (at DEBUG in between): an ERROR and a WARNING
#: at every retry buried the one line that says what to do.
REFUSAL_LOG_EVERY_S = 60.0
#: After a session ends on its own, the heartbeat that tells the hub goes no sooner than this after the one before
#: began, so that a burst of ends (a room closing, an engine failing) costs the hub one heartbeat, not one each.
ENDED_HEARTBEAT_GAP_S = 0.25


class _RegistrationRefused(HubUnavailable):
    """Every hub tried answered the registration with a refusal, already logged as such; retried all the same."""


class _RefusalLog:
    """The refusals of registrations: each status loud the first time and then once a minute at most, and a line
    when a registration is accepted after them."""

    def __init__(self) -> None:
        self._logged_at: dict[int, float] = {}  # status: when its refusal was last logged loudly (monotonic)
        self._unlogged: dict[int, int] = {}  # status: refusals since then, at DEBUG only
        self._count = 0

    def refused(self, status: int, level: int, message: str) -> None:
        self._count += 1
        now, logged_at = time.monotonic(), self._logged_at.get(status)
        if logged_at is not None and now - logged_at < REFUSAL_LOG_EVERY_S:
            self._unlogged[status] = self._unlogged.get(status, 0) + 1
            log.debug("%s; retrying", message)
            return
        unlogged = self._unlogged.pop(status, 0)
        since = f" (refused {unlogged} more times in the last {now - logged_at:.0f}s)" if logged_at is not None else ""
        log.log(level, "%s; retrying%s", message, since)
        self._logged_at[status] = now

    def accepted(self) -> None:
        if self._count:
            log.info("registration accepted after %d refusals", self._count)
        self._logged_at.clear()
        self._unlogged.clear()
        self._count = 0


class HubClient:
    def __init__(self, hub_urls: list[str], worker_token: str, registration: WorkerRegistration,
                 manager: SessionManager, gpus: list[Gpu] | None = None, timeout_s: float = 3.0,
                 backoff_cap_s: float = 10.0, use_channel: bool = True) -> None:
        self.hub_urls = hub_urls
        self._token = worker_token
        self.registration = registration
        self.manager = manager
        self.gpus = gpus or []
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.backoff_cap_s = backoff_cap_s
        self.secret: str | None = None
        self._next_secret: str | None = None  # the secret the registration under way proposes
        self.interval_s = 3.0
        self.hub_url: str | None = None  # the hub that answered last
        self._failing: list[str] = []  # hubs whose last request failed, the one that failed most recently last
        self._refusal_log = _RefusalLog()
        self.registered = asyncio.Event()
        self.registrations = 0
        self.last_reply: HeartbeatReply | None = None
        self._http: aiohttp.ClientSession | None = None
        self.use_channel = use_channel
        self._channel = HeartbeatChannel(timeout_s, http=self._session, headers=self._headers, on_reply=self._apply,
                                         on_secret_refused=self._secret_refused)
        self._beating = asyncio.Lock()
        self._gpu_probe: asyncio.Future[list[Gpu]] | None = None  # a probe whose answer is not yet taken
        self._gpu_probe_hung = False  # warned that it does not answer; heartbeats carry the last reading
        #: How the last heartbeat went: ``channel`` or ``post``.
        self.transport = "post"
        psutil.cpu_percent(None)  # prime: the first non-blocking reading is otherwise meaningless

    @property
    def worker_id(self) -> str:
        return self.registration.worker_id

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=self.timeout)
        return self._http

    async def aclose(self) -> None:
        await self._channel.close()
        if self._http is not None:
            await self._http.close()

    def _headers(self, with_secret: bool = True) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if with_secret and self.secret:
            headers["X-Worker-Secret"] = self.secret
        return headers

    def _ordered_hubs(self) -> list[str]:
        """The hub that last answered first, then the others; those whose last request failed go last, the one
        that failed most recently at the very end (a frozen hub costs a timeout per request it is sent)."""
        failing = [url for url in self._failing if url in self.hub_urls]
        healthy = [url for url in self.hub_urls if url not in failing]
        if self.hub_url in healthy:
            healthy = [self.hub_url, *(url for url in healthy if url != self.hub_url)]
        return healthy + failing

    def _hub_answered(self, url: str) -> None:
        self.hub_url = url
        if url in self._failing:
            self._failing.remove(url)

    def _hub_failed(self, url: str) -> None:
        if url in self._failing:
            self._failing.remove(url)
        self._failing.append(url)

    async def register_once(self) -> RegistrationAccepted:
        """One pass over the hubs; raises HubUnavailable if none accepted.

        The worker chooses its next secret and sends it until a registration is accepted: a registration the hub
        ran but whose answer was lost is then simply sent again, where a secret of the hub's making (which the
        worker never learned) would lock it out of its own id until its TTL lapsed."""
        body = self.registration.model_dump(mode="json")
        # A worker that is leaving and registers again (the hub had lost it) must not become routable meanwhile.
        body["state"] = (WorkerState.DRAINING if self.manager.leaving else WorkerState.READY).value
        # Nor one an SRE drained: a hub that lost its keys (Redis restarted empty) would answer `ready`. Sent only
        # when set, so a hub that predates the field still takes every other registration.
        body.pop("drain_requested", None)
        if self.manager.drained_by_hub:
            body["drain_requested"] = True
        self._next_secret = self._next_secret or new_secret()
        headers = {**self._headers(), "X-Worker-New-Secret": self._next_secret}
        failures: list[HubUnavailable] = []
        for url in self._ordered_hubs():
            try:
                accepted = await self._register_at(url, body, headers)
            except HubUnavailable as exc:
                failures.append(exc)
                continue
            await self._take_registration(url, accepted)
            return accepted
        last = str(failures[-1]) if failures else "no hub configured"
        if failures and all(isinstance(failure, _RegistrationRefused) for failure in failures):
            raise _RegistrationRefused(last)
        raise HubUnavailable(last)

    async def _register_at(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> RegistrationAccepted:
        """The registration sent to one hub; raises HubUnavailable saying why that hub did not accept it."""
        try:
            async with self._session().post(f"{url}/api/v1/workers", json=body, headers=headers) as resp:
                payload = await resp.json(content_type=None) if resp.status < 500 else None
                if resp.status == 200:
                    return RegistrationAccepted.model_validate(payload)
        except (aiohttp.ClientError, TimeoutError, ValidationError, ValueError) as exc:
            self._hub_failed(url)
            raise HubUnavailable(f"{_shown(url)}: {describe_error(exc)}") from None
        if resp.status >= 500:
            self._hub_failed(url)
        elif resp.status in (401, 409, 422):
            self._refusal_log.refused(resp.status, *self._describe_refusal(url, resp.status, payload))
            raise _RegistrationRefused(f"{_shown(url)} answered {resp.status}")
        raise HubUnavailable(f"{_shown(url)} answered {resp.status}")

    def _describe_refusal(self, url: str, status: int, payload: Any) -> tuple[int, str]:
        """How loud a refusal of the registration is, and what it says to do (never with the token)."""
        if status == 401:  # a misconfiguration: retrying changes nothing until the token is put right
            return logging.ERROR, (f"hub {_shown(url)} refused the worker token (401): check FLEET_WORKER_TOKEN, "
                                   "which must be the hubs' worker token")
        if status == 409:  # a previous incarnation still holds the id: retrying will succeed
            return logging.WARNING, (f"worker id {self.worker_id} is still held by its previous registration (409): "
                                     "the hubs accept this one once it lapses, within their worker TTL "
                                     "(FLEET_WORKER_TTL_S), unless another live worker has this id")
        return logging.ERROR, f"hub {_shown(url)} refused the registration ({status}): {payload}"

    async def _take_registration(self, url: str, accepted: RegistrationAccepted) -> None:
        self._refusal_log.accepted()
        self.secret, self._next_secret = accepted.worker_secret, None
        if self._channel.secret not in (None, self.secret):
            # The hub refuses the old secret from now on: a heartbeat still on its way there would be closed with
            # 4403, which must not be read as a refusal of the new one.
            await self._channel.close(abandon=True)
        self.interval_s = accepted.heartbeat_interval_s
        self._hub_answered(url)
        self.registrations += 1
        self.registered.set()
        log.info("registered %s with %s (heartbeat every %.1fs)", self.worker_id, _shown(url),
                 accepted.heartbeat_interval_s)

    async def register(self) -> RegistrationAccepted:
        """Register, retrying forever with capped exponential backoff and jitter."""
        self.registered.clear()
        delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
        while True:
            try:
                return await self.register_once()
            except HubUnavailable as exc:
                delay = next(delays)
                # A refusal has its own line (once, then once a minute): one more at every retry would bury it.
                level = logging.DEBUG if isinstance(exc, _RegistrationRefused) else logging.WARNING
                log.log(level, "registration failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    async def build_heartbeat(self) -> Heartbeat:
        stats = self.manager.engine.stats()
        live = self.gpus = await self._probe_gpus(stats.vram_used_mb)
        util = sum(g.utilization for g in live) / len(live) if live else 0.0
        vram = sum(g.vram_used_mb for g in live) if live else stats.vram_used_mb
        seq, running = self.manager.snapshot()
        return Heartbeat(
            active_sessions=running, seq=seq,
            cpu_percent=min(100.0, psutil.cpu_percent(None)),
            memory_percent=min(100.0, psutil.virtual_memory().percent),
            gpu_utilization=min(100.0, util),
            vram_used_mb=max(0, vram),
            latency_ms=min(3_600_000.0, max(0.0, stats.latency_ms)),
            error_rate=min(1.0, max(0.0, stats.error_rate)),
            # Only the worker's own drain: one an SRE asked for is the hub's to lift (a resume), and a heartbeat
            # reporting it would hold the hub's state at draining for good.
            state=WorkerState.DRAINING if self.manager.leaving else WorkerState.READY,
        )

    async def _probe_gpus(self, vram_used_by_engine_mb: int) -> list[Gpu]:
        """Live GPU figures, probed off the event loop (NVML can block on a busy driver) and within half the shorter
        of the interval and the hub timeout: a hung probe (nvidia-smi has no timeout, nvmlInit can block) must not
        stop the heartbeats. Until it answers, heartbeats carry the last reading and no second probe starts; a late
        answer is the next heartbeat's reading."""
        probe = self._gpu_probe
        if probe is None:
            probe = self._gpu_probe = _in_daemon_thread(gpu_probe.refresh, self.gpus, vram_used_by_engine_mb)
            bound_s = min(self.interval_s, self.timeout_s) / 2
            await asyncio.wait({probe}, timeout=bound_s)  # neither cancels nor raises: a thread cannot be stopped
            if not probe.done() and not self._gpu_probe_hung:
                self._gpu_probe_hung = True
                log.warning("the GPU probe has not answered in %.2fs (a hung nvidia-smi or NVML?); heartbeats carry "
                            "the last GPU reading until it does", bound_s)
        if not probe.done():
            return self.gpus
        self._gpu_probe = None
        if self._gpu_probe_hung:
            self._gpu_probe_hung = False
            log.info("the GPU probe answers again")
        return probe.result()

    async def heartbeat_once(self) -> None:
        """One heartbeat, to the current hub or, when it fails there, to the others in turn; raises WorkerForgotten
        or HubUnavailable. One at a time: the drain's own heartbeat must not share the channel, and its answer, with
        the loop's."""
        async with self._beating:
            if self.hub_url is None or self.secret is None:
                raise WorkerForgotten("not registered")
            beat = await self.build_heartbeat()
            hubs = self._ordered_hubs()
            if not hubs:
                raise HubUnavailable("no hub configured")
            if self.use_channel and await self._heartbeat_on_channel(hubs[0], self.secret, beat):
                return
            self._apply(await self._heartbeat_post_to_any(beat))

    async def _heartbeat_on_channel(self, hub_url: str, secret: str, beat: Heartbeat) -> bool:
        """The heartbeat over the channel; False when it has to go by POST this time."""
        # While the hub holds the worker drained, each heartbeat reports `ready` and the hub has no news to send
        # when an SRE resumes it: only an awaited answer tells the worker it may take sessions again.
        delivery = await self._channel.send(self._heartbeat_url(hub_url), secret, beat, interval_s=self.interval_s,
                                            must_ask=self.manager.drained_by_hub)
        if delivery is Delivery.ANSWERED:
            self._hub_answered(hub_url)
        elif delivery is Delivery.POST_ELSEWHERE:
            self._hub_failed(hub_url)
        if delivery in (Delivery.POST, Delivery.POST_ELSEWHERE):
            return False
        self.transport = "channel"
        return True

    async def _heartbeat_post_to_any(self, beat: Heartbeat) -> HeartbeatReply:
        """POST the heartbeat to each hub in turn until one answers: all share the registry, and a hub that is down
        or frozen must not cost the worker its TTL while another one answers."""
        failure = HubUnavailable("no hub configured")
        for url in self._ordered_hubs():
            try:
                reply = await self._heartbeat_post(url, beat)
            except HubUnavailable as exc:
                self._hub_failed(url)
                failure = exc
                continue
            self._hub_answered(url)
            return reply
        raise failure

    async def _heartbeat_post(self, hub_url: str, beat: Heartbeat) -> HeartbeatReply:
        body = beat.model_dump(mode="json")
        try:
            async with self._session().post(self._heartbeat_url(hub_url), json=body, headers=self._headers()) as resp:
                if resp.status == 403:
                    # Our secret is no longer the worker's: presenting it again would only earn 409s.
                    self.secret = None
                    raise WorkerForgotten("hub refused the worker secret (403)")
                if resp.status == 404:
                    raise WorkerForgotten("hub does not know this worker (404)")
                if resp.status != 200:
                    raise HubUnavailable(f"{_shown(hub_url)} answered {resp.status}")
                reply = HeartbeatReply.model_validate(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValidationError, ValueError) as exc:
            raise HubUnavailable(f"{_shown(hub_url)}: {describe_error(exc)}") from None
        self.transport = "post"
        return reply

    def _heartbeat_url(self, hub_url: str) -> str:
        return f"{hub_url}/api/v1/workers/{self.worker_id}/heartbeat"

    def _secret_refused(self, secret: str) -> None:
        """A hub refused ``secret``: forget it, unless a registration made since has replaced it."""
        if self.secret == secret:
            self.secret = None

    def _apply(self, reply: HeartbeatReply) -> None:
        """Follow a hub's answer. Its stops leave the count now; the engine's part runs in tasks of their own: an
        answer waited on is not held up by a slow goodbye, and closing the channel cannot cut a stop half-way."""
        self.last_reply = reply
        self.interval_s = reply.heartbeat_interval_s
        # The hub's state is draining when an SRE drained this worker (or it reported its own drain): follow it
        # both ways, so a resume there takes effect here.
        self.manager.set_drained_by_hub(reply.state is WorkerState.DRAINING)
        for session_id in reply.stop_sessions:
            log.info("hub does not hold session %s; stopping it", shown_session_id(session_id))
            self.manager.begin_stop(session_id)

    async def heartbeat_loop(self) -> None:
        """Heartbeat at the hub's interval forever; re-register when forgotten, back off when hubs fail. Nothing
        ends the loop but cancellation: a worker that stopped heartbeating would leave routing with its sessions
        still running."""
        delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
        forgotten = 0  # in a row: a hub that forgets the worker again at once must not make it spin
        while True:
            started = time.monotonic()
            try:
                await self.heartbeat_once()
                self.manager.metrics.heartbeats.labels("ok").inc()
                delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
                forgotten = 0
                await self._until_next_heartbeat(started)
            except WorkerForgotten as exc:
                self.manager.metrics.heartbeats.labels("forgotten").inc()
                log.warning("hub forgot worker %s (%s); registering again", self.worker_id, exc)
                if forgotten:
                    await asyncio.sleep(min(next(delays), self.interval_s))
                forgotten += 1
                await self._reregister()
            except HubUnavailable as exc:
                # Every hub was tried (heartbeat_once goes round them): registering would ask them all again.
                self.manager.metrics.heartbeats.labels("failed").inc()
                await self._back_off(f"heartbeat failed ({exc})", next(delays))
            except Exception as exc:  # a bug or a broken probe (NVML, the engine's stats): log it, keep beating
                self.manager.metrics.heartbeats.labels("failed").inc()
                log.exception("heartbeat could not be built or applied")
                await self._back_off(f"heartbeat failed ({describe_error(exc)})", next(delays))

    async def _until_next_heartbeat(self, started: float) -> None:
        """Until an interval after the last heartbeat began, or sooner when a session ends on its own.

        The interval runs from the heartbeat's start: a slow answer (a loaded hub, the channel's wait for one) must
        not add itself to every gap the hub sees, which the TTL allows only three intervals. A session's end is
        told at once because the hub holds the session, and hands it to a client presenting its ``session_key``,
        until a heartbeat leaves it out: a user who reconnects right after the agent left would join an empty
        room. Ends within ``ENDED_HEARTBEAT_GAP_S`` of the last heartbeat share the next one."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, started + self.interval_s - time.monotonic())):
                await self.manager.ended_unreported.wait()
        await asyncio.sleep(max(0.0, started + min(ENDED_HEARTBEAT_GAP_S, self.interval_s) - time.monotonic()))

    async def _back_off(self, what: str, delay: float) -> None:
        delay = min(delay, self.interval_s)
        log.warning("%s; sessions keep running; retrying in %.2fs", what, delay)
        await asyncio.sleep(delay)

    async def _reregister(self) -> None:
        # Our secret is presented, so a hub that still holds us accepts at once; then heartbeat immediately.
        await self.register()

    async def deregister(self) -> bool:
        await self._channel.close()
        if self.hub_url is None or self.secret is None:
            return False
        for url in self._ordered_hubs():
            try:
                async with self._session().delete(f"{url}/api/v1/workers/{self.worker_id}",
                                                  headers=self._headers()) as resp:
                    if resp.status in (204, 404):
                        log.info("deregistered %s", self.worker_id)
                        return True
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("deregistration via %s failed: %s", _shown(url), describe_error(exc))
        return False

    def describe(self) -> dict[str, Any]:
        hub = _shown(self.hub_url) if self.hub_url is not None else None
        return {"worker_id": self.worker_id, "hub": hub, "registered": self.registered.is_set(),
                "heartbeats_by": self.transport}


def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a thread of its own, as a future of the running loop. A daemon thread: one that hangs (a
    wedged nvidia-smi) must not hold the process's exit after the drain, as a thread of asyncio's executor would."""
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the heartbeat, which logs it
            outcome.set_exception(exc)

    threading.Thread(target=run, name="gpu-probe", daemon=True).start()
    return asyncio.wrap_future(outcome)


def _shown(url: str) -> str:
    """A hub URL for logs and answers: without any user:password (the worker's /health needs no token; the settings
    refuse such a URL, a caller building HubClient itself may not). The userinfo, up to its last ``@``, holds no
    ``/``, ``?`` or ``#``."""
    return re.sub(r"(?<=//)[^/?#]*@", "", url, count=1)
