"""Talks to the hubs: register with backoff across FLEET_HUB_URLS, heartbeat, re-register, deregister.

Failures never stop the worker serving its sessions: a heartbeat or registration that fails on one hub goes to the
next at once (every hub shares the registry), the hub that just failed last; when every hub fails, it is logged and
retried with capped exponential backoff and jitter. A hub that forgot the worker (404) or refuses its secret (403)
gets a new registration, and the next heartbeat re-announces the sessions still running.

Heartbeats go over one WebSocket kept open on the heartbeat URL (a message costs the hub a fraction of a POST);
when it cannot be opened (an old hub, a proxy without upgrades) or drops, that heartbeat is POSTed instead and
the channel is tried again later, after a random delay that grows while the upgrade keeps failing. On the channel
a heartbeat asks the hub for an answer when the one before it did not (so every second heartbeat), when it reports
a new state, and while the hub holds the worker drained (its resume is news only the worker can ask for); the hub
answers the others only with news (an SRE drain, sessions to stop). A reader task applies every answer the moment
it comes (the engine's stops run in tasks of their own, which closing the channel does not cut short), and keeps
an error or the channel's end for the next heartbeat to raise. An awaited answer that does not come within half
an interval means the channel is lost: it is dropped without a closing handshake and that heartbeat is POSTed, to
another hub first, so a hub that froze holding the channel costs the worker at most two and a half intervals of
heartbeats, within its TTL of three.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import psutil
from pydantic import ValidationError

from shared.auth import new_secret
from shared.backoff import backoff_delays
from shared.models import (
    MAX_HEARTBEAT_BYTES,
    Heartbeat,
    HeartbeatReply,
    RegistrationAccepted,
    WorkerRegistration,
    WorkerState,
)
from worker import gpus as gpu_probe
from worker.gpus import Gpu
from worker.sessions import SessionManager

log = logging.getLogger(__name__)
T = TypeVar("T")


#: On the channel, at least every ACK_EVERY-th heartbeat asks for an answer: the hub is alive and the channel open.
#: Two: a frozen hub is noticed two intervals and an answer's wait after its last heartbeat, inside its TTL.
ACK_EVERY = 2
#: The shortest wait for an awaited answer on the channel, whatever the interval: a busy host, not a lost hub.
MIN_ANSWER_WAIT_S = 0.25
#: After the heartbeat channel could not be opened, heartbeats go by POST for a while before it is tried again: a
#: random delay (full jitter) whose ceiling starts here and doubles with each failure in a row, up to the cap. Workers
#: refused together (a hub restarting) do not come back together; a proxy that never upgrades is asked ever less.
CHANNEL_RETRY_BASE_S = 30.0
CHANNEL_RETRY_CAP_S = 300.0


class HubUnavailable(Exception):
    """No hub answered usefully; retryable."""


class _ChannelLost(Exception):
    """The heartbeat channel closed or stopped answering: this heartbeat goes by POST."""


class WorkerForgotten(Exception):
    """The hub does not know this worker (404) or refused its secret (403): register again."""


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
        self.registered = asyncio.Event()
        self.registrations = 0
        self.last_reply: HeartbeatReply | None = None
        self._http: aiohttp.ClientSession | None = None
        self.use_channel = use_channel
        self._channel: aiohttp.ClientWebSocketResponse | None = None
        self._channel_for: tuple[str, str] | None = None  # (hub, secret) the open channel authenticated with
        self._channel_retry_at: dict[str, float] = {}  # hub -> when (monotonic) its channel may be tried again
        self._channel_retry_delays = _channel_retry_delays()
        self._channel_reader: asyncio.Task[None] | None = None
        self._channel_answered = asyncio.Event()  # set by the reader after each answer (or error) it takes
        self._channel_error: Exception | None = None  # what the reader found for the next heartbeat to raise
        self._unanswered = 0  # heartbeats sent on the open channel without asking for an answer, in a row
        self._reported_state: WorkerState | None = None  # the state the last answered heartbeat reported
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
        await self._close_channel()
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
        self._next_secret = self._next_secret or new_secret()
        headers = {**self._headers(), "X-Worker-New-Secret": self._next_secret}
        last = "no hub configured"
        for url in self._ordered_hubs():
            try:
                async with self._session().post(f"{url}/api/v1/workers", json=body, headers=headers) as resp:
                    payload = await resp.json(content_type=None) if resp.status < 500 else None
                    if resp.status == 200:
                        accepted = RegistrationAccepted.model_validate(payload)
                        self.secret, self._next_secret = accepted.worker_secret, None
                        if self._channel_for is not None and self._channel_for[1] != self.secret:
                            # The hub refuses the old secret from now on: a heartbeat still on its way there would
                            # be closed with 4403, which must not be read as a refusal of the new one.
                            await self._close_channel(abandon=True)
                        self.interval_s = accepted.heartbeat_interval_s
                        self._hub_answered(url)
                        self.registrations += 1
                        self.registered.set()
                        log.info("registered %s with %s (heartbeat every %.1fs)", self.worker_id, url,
                                 accepted.heartbeat_interval_s)
                        return accepted
                    last = f"{url} answered {resp.status}"
                    if resp.status >= 500:
                        self._hub_failed(url)
                    elif resp.status == 409:
                        # A previous incarnation still holds the id until its TTL lapses: retrying will succeed.
                        log.warning("worker id %s still held by a live registration; retrying", self.worker_id)
                    elif resp.status in (401, 422):
                        log.error("hub %s refused the registration (%s): %s", url, resp.status, payload)
            except (aiohttp.ClientError, TimeoutError, ValidationError, ValueError) as exc:
                self._hub_failed(url)
                last = f"{url}: {describe_error(exc)}"
        raise HubUnavailable(last)

    async def register(self) -> RegistrationAccepted:
        """Register, retrying forever with capped exponential backoff and jitter."""
        self.registered.clear()
        delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
        while True:
            try:
                return await self.register_once()
            except HubUnavailable as exc:
                delay = next(delays)
                log.warning("registration failed (%s); retrying in %.2fs", exc, delay)
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

    def _answer_wait_s(self) -> float:
        """How long an awaited answer on the channel may take before the channel counts as lost."""
        return min(self.timeout_s, max(self.interval_s / 2, MIN_ANSWER_WAIT_S))

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
        url = f"{hub_url}/api/v1/workers/{self.worker_id}/heartbeat"
        try:
            async with self._session().post(url, json=body, headers=self._headers()) as resp:
                if resp.status == 403:
                    # Our secret is no longer the worker's: presenting it again would only earn 409s.
                    self.secret = None
                    raise WorkerForgotten("hub refused the worker secret (403)")
                if resp.status == 404:
                    raise WorkerForgotten("hub does not know this worker (404)")
                if resp.status != 200:
                    raise HubUnavailable(f"{hub_url} answered {resp.status}")
                reply = HeartbeatReply.model_validate(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValidationError, ValueError) as exc:
            raise HubUnavailable(f"{hub_url}: {describe_error(exc)}") from None
        self.transport = "post"
        return reply

    async def _heartbeat_on_channel(self, hub_url: str, secret: str, beat: Heartbeat) -> bool:
        """The heartbeat over the channel; False when it has to go by POST this time."""
        ws = await self._open_channel(hub_url, secret)
        if ws is None:
            return False
        # While the hub holds the worker drained, each heartbeat reports `ready` and the hub has no news to send
        # when an SRE resumes it: only an awaited answer tells the worker it may take sessions again.
        ack = (self._unanswered >= ACK_EVERY - 1 or beat.state is not self._reported_state
               or self.manager.drained_by_hub)
        self._unanswered = 0 if ack else self._unanswered + 1
        try:
            self._raise_channel_error()
            self._channel_answered.clear()
            await ws.send_str(beat.model_copy(update={"ack": ack}).model_dump_json())
            if ack:
                await asyncio.wait_for(self._channel_answered.wait(), self._answer_wait_s())
                self._raise_channel_error()
                self._reported_state = beat.state
                self._hub_answered(hub_url)
        except (_ChannelLost, aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            log.info("heartbeat channel lost (%s); this heartbeat goes by POST", describe_error(exc))
            self._hub_failed(hub_url)
            await self._close_channel(abandon=True)
            return False
        except (WorkerForgotten, HubUnavailable):
            if ws.closed:
                await self._close_channel()
            raise
        self.transport = "channel"
        return True

    def _raise_channel_error(self) -> None:
        error, self._channel_error = self._channel_error, None
        if error is not None:
            raise error

    def _read_answer(self, message: aiohttp.WSMessage, ws: aiohttp.ClientWebSocketResponse,
                     secret: str) -> HeartbeatReply:
        """A message from the hub as a reply, on a channel opened with ``secret``; raises for an error answer or a
        closed channel."""
        if message.type is not aiohttp.WSMsgType.TEXT:
            code = message.data if message.type is aiohttp.WSMsgType.CLOSE else None
            if code is None:
                code = ws.close_code
            if code == 4404:
                raise WorkerForgotten("hub does not know this worker (channel closed 4404)")
            if code == 4403:
                if self.secret == secret:  # not a newer one, from a registration made since the channel opened
                    self.secret = None
                raise WorkerForgotten("hub refused the worker secret (channel closed 4403)")
            raise _ChannelLost(f"channel closed ({code} {message.extra})")
        try:
            data = json.loads(message.data)
            if isinstance(data, dict) and "error" in data:  # e.g. Redis unavailable: the channel stays open
                raise HubUnavailable(f"hub answered {data['error']}")
            return HeartbeatReply.model_validate(data)
        except (ValueError, ValidationError) as exc:
            raise _ChannelLost(f"malformed heartbeat reply: {describe_error(exc)}") from None

    async def _open_channel(self, hub_url: str, secret: str) -> aiohttp.ClientWebSocketResponse | None:
        if self._channel is not None and not self._channel.closed and self._channel_for == (hub_url, secret):
            return self._channel
        if self._channel is not None and self._channel_for == (hub_url, secret) and self._channel_error is not None:
            return self._channel  # closed, but its last words (a close code, an error) are still to be raised
        await self._close_channel()
        if time.monotonic() < self._channel_retry_at.get(hub_url, 0.0):
            return None
        try:
            self._channel = await self._session().ws_connect(
                f"{hub_url}/api/v1/workers/{self.worker_id}/heartbeat", headers=self._headers(),
                timeout=aiohttp.ClientWSTimeout(ws_close=self.timeout.total),
                max_msg_size=MAX_HEARTBEAT_BYTES)  # an answer lists at most the sessions a heartbeat can
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # An old hub or a proxy without upgrades: POST, and try the channel again later.
            delay = next(self._channel_retry_delays)
            self._channel_retry_at[hub_url] = time.monotonic() + delay
            if not isinstance(exc, aiohttp.WSServerHandshakeError):
                self._hub_failed(hub_url)  # it did not answer at all: this heartbeat is POSTed to another hub first
            log.info("heartbeat channel unavailable (%s); heartbeats go by POST for %.1f s", describe_error(exc),
                     delay)
            return None
        self._channel_retry_at.pop(hub_url, None)
        self._channel_retry_delays = _channel_retry_delays()
        self._channel_for = (hub_url, secret)
        self._unanswered = ACK_EVERY  # the first heartbeat on a channel asks for an answer
        self._channel_error = None
        self._channel_reader = asyncio.create_task(self._read_channel(self._channel, secret),
                                                   name="heartbeat channel reader")
        return self._channel

    async def _read_channel(self, ws: aiohttp.ClientWebSocketResponse, secret: str) -> None:
        """The channel's only reader: applies each answer at once (news does not wait for the next heartbeat);
        an error answer, or the channel's end, is kept for the heartbeat to raise."""
        while True:
            message = await ws.receive()
            try:
                self._apply(self._read_answer(message, ws, secret))
            except (_ChannelLost, WorkerForgotten, HubUnavailable) as exc:
                self._channel_error = exc
            except Exception as exc:  # applying went wrong here, not the channel: say so, go on
                log.exception("applying the hub's answer failed")
                self._channel_error = HubUnavailable(f"applying the hub's answer failed: {describe_error(exc)}")
            self._channel_answered.set()
            if message.type is not aiohttp.WSMsgType.TEXT:
                return

    async def _close_channel(self, abandon: bool = False) -> None:
        """Close the channel; ``abandon``: without waiting for the hub's side of the closing handshake (a hub that
        froze would hold it for the whole close timeout)."""
        channel, self._channel, self._channel_for = self._channel, None, None
        reader, self._channel_reader = self._channel_reader, None
        self._channel_error = None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if channel is not None and not channel.closed:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ConnectionError):
                # A timeout cancels the wait for the hub's close frame, and aiohttp then drops the connection.
                async with asyncio.timeout(0 if abandon else None):
                    await channel.close()

    def _apply(self, reply: HeartbeatReply) -> None:
        """Follow a hub's answer. Its stops leave the count now; the engine's part runs in tasks of their own: an
        answer waited on is not held up by a slow goodbye, and closing the channel cannot cut a stop half-way."""
        self.last_reply = reply
        self.interval_s = reply.heartbeat_interval_s
        # The hub's state is draining when an SRE drained this worker (or it reported its own drain): follow it
        # both ways, so a resume there takes effect here.
        self.manager.set_drained_by_hub(reply.state is WorkerState.DRAINING)
        for session_id in reply.stop_sessions:
            log.info("hub does not hold session %s; stopping it", session_id)
            self.manager.begin_stop(session_id)

    async def heartbeat_loop(self) -> None:
        """Heartbeat at the hub's interval forever; re-register when forgotten, back off when hubs fail. Nothing
        ends the loop but cancellation: a worker that stopped heartbeating would leave routing with its sessions
        still running."""
        delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
        forgotten = 0  # in a row: a hub that forgets the worker again at once must not make it spin
        while True:
            try:
                await self.heartbeat_once()
                self.manager.metrics.heartbeats.labels("ok").inc()
                delays = backoff_delays(base_s=0.2, cap_s=self.backoff_cap_s)
                forgotten = 0
                await asyncio.sleep(self.interval_s)
            except WorkerForgotten as exc:
                self.manager.metrics.heartbeats.labels("forgotten").inc()
                log.warning("hub forgot worker %s (%s); registering again", self.worker_id, exc)
                if forgotten:
                    await asyncio.sleep(min(next(delays), self.interval_s))
                forgotten += 1
                await self._reregister()
            except HubUnavailable as exc:
                self.manager.metrics.heartbeats.labels("failed").inc()
                await self._back_off(f"heartbeat failed ({exc})", next(delays))
                if len(self.hub_urls) > 1:
                    await self._reregister_elsewhere()
            except Exception as exc:  # a bug or a broken probe (NVML, the engine's stats): log it, keep beating
                self.manager.metrics.heartbeats.labels("failed").inc()
                log.exception("heartbeat could not be built or applied")
                await self._back_off(f"heartbeat failed ({describe_error(exc)})", next(delays))

    async def _back_off(self, what: str, delay: float) -> None:
        delay = min(delay, self.interval_s)
        log.warning("%s; sessions keep running; retrying in %.2fs", what, delay)
        await asyncio.sleep(delay)

    async def _reregister(self) -> None:
        # Our secret is presented, so a hub that still holds us accepts at once; then heartbeat immediately.
        self.hub_url = self.hub_url or (self.hub_urls[0] if self.hub_urls else None)
        await self.register()

    async def _reregister_elsewhere(self) -> None:
        """With several hubs, try the registration on any of them, those that just failed last; each shares the
        registry, so any will do."""
        with contextlib.suppress(HubUnavailable):
            await self.register_once()

    async def deregister(self) -> bool:
        await self._close_channel()
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
                log.warning("deregistration via %s failed: %s", url, describe_error(exc))
        return False

    def describe(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "hub": self.hub_url, "registered": self.registered.is_set(),
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


def _channel_retry_delays() -> Iterator[float]:
    return backoff_delays(base_s=CHANNEL_RETRY_BASE_S, cap_s=CHANNEL_RETRY_CAP_S)


def describe_error(exc: BaseException) -> str:
    """An error for logs and messages. Never ``repr``: aiohttp's response errors carry the request's headers there,
    and those hold the worker token and secret. Nor a validation error's text: it quotes the input, and a
    registration answer holds the worker secret."""
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'answer'}: {error['msg']}"
                             for error in exc.errors(include_url=False, include_input=False, include_context=False))
        return f"{type(exc).__name__}: {problems}"
    return f"{type(exc).__name__}: {exc}"
