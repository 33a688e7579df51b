"""The hub's calls to workers: hand over a session, or stop one. Every call is bounded by a timeout."""

from __future__ import annotations

import logging
from enum import StrEnum

import httpx

from shared.models import SessionDispatch

log = logging.getLogger(__name__)


class DispatchOutcome(StrEnum):
    ACCEPTED = "accepted"
    FULL = "full"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"


class WorkerClient:
    def __init__(self, worker_token: str, timeout_s: float, max_connections: int = 256) -> None:
        self._headers = {"Authorization": f"Bearer {worker_token}"}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 1.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def dispatch(self, worker_url: str, body: SessionDispatch) -> DispatchOutcome:
        try:
            resp = await self._http.post(
                f"{worker_url.rstrip('/')}/sessions", content=body.model_dump_json(), headers={
                    **self._headers, "Content-Type": "application/json"},
            )
        except httpx.TimeoutException:
            return DispatchOutcome.TIMEOUT
        except httpx.HTTPError as exc:
            log.info("dispatch to %s failed: %s", worker_url, type(exc).__name__)
            return DispatchOutcome.UNREACHABLE
        if resp.status_code == 201:
            return DispatchOutcome.ACCEPTED
        if resp.status_code == 409:
            return DispatchOutcome.FULL
        log.warning("worker %s refused a dispatch with HTTP %s", worker_url, resp.status_code)
        return DispatchOutcome.REFUSED

    async def stop(self, worker_url: str, session_id: str) -> bool:
        """Best effort: True when the worker stopped it or never had it."""
        try:
            resp = await self._http.delete(f"{worker_url.rstrip('/')}/sessions/{session_id}", headers=self._headers)
        except httpx.HTTPError as exc:
            log.info("stopping %s on %s failed: %s", session_id, worker_url, type(exc).__name__)
            return False
        return resp.status_code in (200, 204, 404)
