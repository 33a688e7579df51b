"""EXPERIMENT, not the shipped hub: ``fleet hub`` with hub.dispatch.WorkerClient swapped for an aiohttp client.

Profiling (py-spy) showed ~55% of the hub's CPU during allocation inside httpx/httpcore (dispatch + stop).
hub/dispatch.py is outside the bench's remit, so this launcher patches the class in-process to measure what the
recommended change would buy. Same outcomes, same timeouts, same headers.

    .venv/bin/python -m bench.allocation --hub-variant aiohttp
"""

from __future__ import annotations

import logging

import aiohttp

import hub.dispatch as dispatch
import hub.main
from shared.models import SessionDispatch

log = logging.getLogger(__name__)


class AiohttpWorkerClient:
    def __init__(self, worker_token: str, timeout_s: float, max_connections: int = 256) -> None:
        self._headers = {"Authorization": f"Bearer {worker_token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 1.0))
        self._limit = max_connections
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._limit),
                                               timeout=self._timeout)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def dispatch(self, worker_url: str, body: SessionDispatch) -> dispatch.DispatchOutcome:
        try:
            async with self._session().post(f"{worker_url.rstrip('/')}/sessions", data=body.model_dump_json(),
                                            headers={**self._headers, "Content-Type": "application/json"}) as resp:
                await resp.read()
                status = resp.status
        except TimeoutError:
            return dispatch.DispatchOutcome.TIMEOUT
        except (aiohttp.ClientError, OSError) as exc:
            log.info("dispatch to %s failed: %s", worker_url, type(exc).__name__)
            return dispatch.DispatchOutcome.UNREACHABLE
        if status == 201:
            return dispatch.DispatchOutcome.ACCEPTED
        if status == 409:
            return dispatch.DispatchOutcome.FULL
        return dispatch.DispatchOutcome.REFUSED

    async def stop(self, worker_url: str, session_id: str) -> bool:
        try:
            async with self._session().delete(f"{worker_url.rstrip('/')}/sessions/{session_id}",
                                              headers=self._headers) as resp:
                await resp.read()
                return resp.status in (200, 204, 404)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False


def main() -> None:
    import argparse

    import uvicorn

    from hub.settings import HubSettings

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    hub.main.WorkerClient = AiohttpWorkerClient  # type: ignore[misc,assignment]
    level = HubSettings().log_level
    logging.basicConfig(level=level)
    uvicorn.run(hub.main.create_app(), host=args.host, port=args.port, log_level=level.lower(), access_log=False)


if __name__ == "__main__":
    main()
