"""The heartbeat channel: one WebSocket kept open on a hub's heartbeat URL (a message costs the hub a fraction of a
POST).

When it cannot be opened (an old hub, a proxy without upgrades) or drops, that heartbeat is POSTed instead and the
channel is tried again later, after a random delay that grows while the upgrade keeps failing. On the channel a
heartbeat asks the hub for an answer when the one before it did not (so every second heartbeat), when it reports a
new state, and while the hub holds the worker drained (its resume is news only the worker can ask for); the hub
answers the others only with news (an SRE drain, sessions to stop). A reader task applies every answer the moment it
comes (the engine's stops run in tasks of their own, which closing the channel does not cut short), and keeps an
error or the channel's end for the next heartbeat to raise. An awaited answer that does not come within half an
interval means the channel is lost: it is dropped without a closing handshake and that heartbeat is POSTed, to
another hub first, so a hub that froze holding the channel costs the worker at most two and a half intervals of
heartbeats, within its TTL of three.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Iterator

import aiohttp
from pydantic import ValidationError

from shared.aio import cancel_and_wait
from shared.backoff import backoff_delays
from shared.models import MAX_HEARTBEAT_BYTES, Heartbeat, HeartbeatReply, WorkerState
from worker.hub_errors import HubUnavailable, WorkerForgotten, describe_error

log = logging.getLogger(__name__)

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


class _ChannelLost(Exception):
    """The heartbeat channel closed or stopped answering: this heartbeat goes by POST."""


class Delivery(enum.Enum):
    """What became of a heartbeat given to the channel."""

    ANSWERED = "answered"  # sent, and the hub answered it: the hub is alive
    SENT = "sent"  # sent without asking for an answer
    POST = "post"  # not sent: no channel to this hub for now (it refused the upgrade, or its retry delay runs)
    POST_ELSEWHERE = "post elsewhere"  # not sent: the hub did not answer, or dropped the channel


class HeartbeatChannel:
    """The channel to one hub at a time, opened with the worker's secret of the moment: a heartbeat for another hub
    or under a new secret closes it and opens another."""

    def __init__(self, timeout_s: float, http: Callable[[], aiohttp.ClientSession],
                 headers: Callable[[], dict[str, str]], on_reply: Callable[[HeartbeatReply], None],
                 on_secret_refused: Callable[[str], None]) -> None:
        self._timeout_s = timeout_s
        self._http = http
        self._headers = headers
        self._on_reply = on_reply  # follows an answer; the reader calls it the moment one comes
        self._on_secret_refused = on_secret_refused  # a close with 4403 refused the secret it is given
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._opened_for: tuple[str, str] | None = None  # (heartbeat URL, secret) the open channel authenticated with
        self._retry_at: dict[str, float] = {}  # heartbeat URL -> when (monotonic) its channel may be tried again
        self._retry_delays = _retry_delays()
        self._reader: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()  # set by the reader after each answer (or error) it takes
        self._error: Exception | None = None  # what the reader found for the next heartbeat to raise
        self._unanswered = 0  # heartbeats sent on the open channel without asking for an answer, in a row
        self._reported_state: WorkerState | None = None  # the state the last answered heartbeat reported

    @property
    def secret(self) -> str | None:
        """The secret the open channel authenticated with."""
        return self._opened_for[1] if self._opened_for is not None else None

    async def send(self, url: str, secret: str, beat: Heartbeat, *, interval_s: float, must_ask: bool) -> Delivery:
        """The heartbeat over the channel on heartbeat URL ``url``, asking for an answer when it is time to or
        ``must_ask``; raises WorkerForgotten or HubUnavailable when the hub answers so."""
        ws = await self._open(url, secret)
        if isinstance(ws, Delivery):
            return ws
        ask = self._unanswered >= ACK_EVERY - 1 or beat.state is not self._reported_state or must_ask
        self._unanswered = 0 if ask else self._unanswered + 1
        try:
            self._raise_error()
            self._answered.clear()
            await ws.send_str(beat.model_copy(update={"ack": ask}).model_dump_json())
            if ask:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns when the answer comes as a cancel
                # does, and the cancel is lost (the heartbeat loop then ran on through a drain).
                async with asyncio.timeout(self._answer_wait_s(interval_s)):
                    await self._answered.wait()
                self._raise_error()
                self._reported_state = beat.state
        except (_ChannelLost, aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            log.info("heartbeat channel lost (%s); this heartbeat goes by POST", describe_error(exc))
            await self.close(abandon=True)
            return Delivery.POST_ELSEWHERE
        except (WorkerForgotten, HubUnavailable):
            if ws.closed:
                await self.close()
            raise
        return Delivery.ANSWERED if ask else Delivery.SENT

    def _answer_wait_s(self, interval_s: float) -> float:
        """How long an awaited answer may take before the channel counts as lost."""
        return min(self._timeout_s, max(interval_s / 2, MIN_ANSWER_WAIT_S))

    def _raise_error(self) -> None:
        error, self._error = self._error, None
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
                self._on_secret_refused(secret)
                raise WorkerForgotten("hub refused the worker secret (channel closed 4403)")
            raise _ChannelLost(f"channel closed ({code} {message.extra})")
        try:
            data = json.loads(message.data)
            if isinstance(data, dict) and "error" in data:  # e.g. Redis unavailable: the channel stays open
                raise HubUnavailable(f"hub answered {data['error']}")
            return HeartbeatReply.model_validate(data)
        except (ValueError, ValidationError) as exc:
            raise _ChannelLost(f"malformed heartbeat reply: {describe_error(exc)}") from None

    async def _open(self, url: str, secret: str) -> aiohttp.ClientWebSocketResponse | Delivery:
        """The channel on ``url`` opened with ``secret``, or how the heartbeat goes instead."""
        if self._ws is not None and not self._ws.closed and self._opened_for == (url, secret):
            return self._ws
        if self._ws is not None and self._opened_for == (url, secret) and self._error is not None:
            return self._ws  # closed, but its last words (a close code, an error) are still to be raised
        await self.close()
        if time.monotonic() < self._retry_at.get(url, 0.0):
            return Delivery.POST
        try:
            self._ws = await self._http().ws_connect(
                url, headers=self._headers(), timeout=aiohttp.ClientWSTimeout(ws_close=self._timeout_s),
                max_msg_size=MAX_HEARTBEAT_BYTES)  # an answer lists at most the sessions a heartbeat can
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            # An old hub or a proxy without upgrades: POST, and try the channel again later.
            delay = next(self._retry_delays)
            self._retry_at[url] = time.monotonic() + delay
            log.info("heartbeat channel unavailable (%s); heartbeats go by POST for %.1f s", describe_error(exc),
                     delay)
            if isinstance(exc, aiohttp.WSServerHandshakeError):
                return Delivery.POST
            return Delivery.POST_ELSEWHERE  # it did not answer at all: this heartbeat is POSTed to another hub first
        self._retry_at.pop(url, None)
        self._retry_delays = _retry_delays()
        self._opened_for = (url, secret)
        self._unanswered = ACK_EVERY  # the first heartbeat on a channel asks for an answer
        self._error = None
        self._reader = asyncio.create_task(self._read(self._ws, secret), name="heartbeat channel reader")
        return self._ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, secret: str) -> None:
        """The channel's only reader: applies each answer at once (news does not wait for the next heartbeat);
        an error answer, or the channel's end, is kept for the heartbeat to raise."""
        while True:
            message = await ws.receive()
            try:
                self._on_reply(self._read_answer(message, ws, secret))
            except (_ChannelLost, WorkerForgotten, HubUnavailable) as exc:
                self._error = exc
            except Exception as exc:  # applying went wrong here, not the channel: say so, go on
                log.exception("applying the hub's answer failed")
                self._error = HubUnavailable(f"applying the hub's answer failed: {describe_error(exc)}")
            self._answered.set()
            if message.type is not aiohttp.WSMsgType.TEXT:
                return

    async def close(self, abandon: bool = False) -> None:
        """Close the channel; ``abandon``: without waiting for the hub's side of the closing handshake (a hub that
        froze would hold it for the whole close timeout)."""
        ws, self._ws, self._opened_for = self._ws, None, None
        reader, self._reader = self._reader, None
        self._error = None
        if reader is not None:
            await cancel_and_wait(reader)
        if ws is not None and not ws.closed:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ConnectionError):
                # A timeout cancels the wait for the hub's close frame, and aiohttp then drops the connection.
                async with asyncio.timeout(0 if abandon else None):
                    await ws.close()


def _retry_delays() -> Iterator[float]:
    return backoff_delays(base_s=CHANNEL_RETRY_BASE_S, cap_s=CHANNEL_RETRY_CAP_S)
