"""The hub's calls to workers: hand over a session, or stop one. Every call is bounded by a timeout.

aiohttp rather than httpx: profiling the allocation benchmark put over half of the hub's CPU inside httpx's
request machinery; aiohttp's client costs a fraction of it per call (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from shared.keys import shown_session_id
from shared.models import SessionDispatch

log = logging.getLogger(__name__)

#: Open connections to workers, in all and per worker: a worker holds a few streams, so a few dispatches and stops
#: at a time; keep-alive then saves a handshake per call.
_MAX_CONNECTIONS = 256
_MAX_CONNECTIONS_PER_WORKER = 32


class DispatchOutcome(StrEnum):
    ACCEPTED = "accepted"
    FULL = "full"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


class StopAnswer(StrEnum):
    STOPPED = "stopped"  # the worker ran the session and has stopped it
    NOT_RUNNING = "not_running"  # the worker does not run it: never did, or it has ended
    UNDELIVERED = "undelivered"  # no answer: timed out, unreachable or refused

    @property
    def delivered(self) -> bool:
        """The worker no longer runs the session."""
        return self is not StopAnswer.UNDELIVERED


@dataclass(frozen=True, slots=True)
class Dispatched:
    outcome: DispatchOutcome
    accepted_at_seq: int | None = None  # from the worker's 201 (see WorkerSessionInfo)


class WorkerClient:
    """Create inside a running event loop (the hub's lifespan); close with ``aclose``."""

    def __init__(self, worker_token: str, timeout_s: float) -> None:
        self._headers = {"Authorization": f"Bearer {worker_token}"}
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 1.0)),
            connector=aiohttp.TCPConnector(limit=_MAX_CONNECTIONS, limit_per_host=_MAX_CONNECTIONS_PER_WORKER),
        )

    async def aclose(self) -> None:
        await self._http.close()

    async def dispatch(self, worker_url: str, body: SessionDispatch) -> Dispatched:
        seq: int | None = None
        try:
            async with self._http.post(
                f"{worker_url.rstrip('/')}/sessions", data=body.model_dump_json(),
                headers={**self._headers, "Content-Type": "application/json"},
            ) as resp:
                status = resp.status
                if status == 201:
                    seq = _accepted_at_seq(await resp.read())
        except TimeoutError:
            return Dispatched(DispatchOutcome.TIMEOUT)
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a URL the client cannot use
            log.info("dispatch to %s failed: %s", worker_url, type(exc).__name__)
            return Dispatched(DispatchOutcome.UNREACHABLE)
        if status == 201:
            return Dispatched(DispatchOutcome.ACCEPTED, seq)
        if status == 409:
            return Dispatched(DispatchOutcome.FULL)
        log.warning("worker %s refused a dispatch with HTTP %s", worker_url, status)
        return Dispatched(DispatchOutcome.REFUSED)

    async def stop(self, worker_url: str, session_id: str) -> StopAnswer:
        """Best effort: never raises."""
        try:
            async with self._http.delete(f"{worker_url.rstrip('/')}/sessions/{session_id}",
                                         headers=self._headers) as resp:
                status = resp.status
        except TimeoutError:
            return StopAnswer.UNDELIVERED
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.info("stopping %s on %s failed: %s", shown_session_id(session_id), worker_url, type(exc).__name__)
            return StopAnswer.UNDELIVERED
        if status in (200, 204):
            return StopAnswer.STOPPED
        if status == 404:
            return StopAnswer.NOT_RUNNING
        log.warning("worker %s refused a stop with HTTP %s", worker_url, status)
        return StopAnswer.UNDELIVERED


def _accepted_at_seq(body: bytes) -> int | None:
    """The worker's ``accepted_at_seq``, if its answer carries a valid one (older workers do not)."""
    try:
        value = json.loads(body).get("accepted_at_seq")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
