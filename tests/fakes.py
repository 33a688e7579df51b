"""Test doubles at the network boundary: a fake worker endpoint that accepts dispatches like a real worker,
instance metadata that answers without a server, and a loopback OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from shared.redis_server import free_port
from worker.imds import Imds, InstanceIdentity


class StaticImds(Imds):
    """An EC2 instance's metadata, fixed: its identity, and ``meta`` (path → text) for the watchers' reads."""

    def __init__(self, instance_id: str = "i-1", meta: dict[str, str] | None = None) -> None:
        super().__init__("http://127.0.0.1:9")
        self.meta = meta or {}
        self.ident = InstanceIdentity(instance_id, "g5.xlarge", "us-east-1", "us-east-1a", "127.0.0.1", None)

    async def identity(self, *, required: bool = False) -> InstanceIdentity | None:
        return self.ident

    async def get(self, path: str) -> str | None:
        return self.meta.get(path)


@contextlib.asynccontextmanager
async def serving_llm(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[str]:
    """An OpenAI-compatible server on a free loopback port whose chat completions ``handler`` answers; yields the
    base URL the LLM clients take (``…/v1``)."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with served(app) as port:
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[int]:
    """``app`` served on a free loopback port, yielded, until the block ends."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield port
    finally:
        await runner.cleanup()


@dataclass
class FakeWorker:
    """Speaks the worker side of the dispatch contract and enforces its own capacity, like the real agent."""

    max_streams: int = 5
    token: str = "dev-worker-token"
    mode: str = "accept"  # accept | full | hang | error | accept_then_error (takes the session, then answers 500)
    delay_s: float = 0.0
    stop_delay_s: float = 0.0  # how long a stop takes to reach it (the network, a busy worker)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    dispatches: int = 0
    #: Dispatches refused because this worker was full: the hub sent more sessions than its slots. A fake that only
    #: refused them would hide the overbooking from ``peak`` (the hub just tries another worker).
    refused_full: int = 0
    peak: int = 0
    port: int = 0
    heartbeat_seq: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeWorker:
        app = web.Application()
        app.router.add_post("/sessions", self._create)
        app.router.add_delete("/sessions/{sid}", self._delete)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    def snapshot(self) -> tuple[int, list[str]]:
        """Like the real worker: number the next heartbeat and list the sessions it reports."""
        self.heartbeat_seq += 1
        return self.heartbeat_seq, list(self.sessions)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _create(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        self.dispatches += 1
        body = await request.json()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "error":
            return web.json_response({"error": "boom"}, status=500)
        if self.mode == "full":
            return web.json_response({"error": "worker_full"}, status=409)
        if len(self.sessions) >= self.max_streams:
            self.refused_full += 1
            return web.json_response({"error": "worker_full"}, status=409)
        self.sessions[body["session_id"]] = body
        self.peak = max(self.peak, len(self.sessions))
        if self.mode == "accept_then_error":
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"session_id": body["session_id"], "accepted_at_seq": self.heartbeat_seq},
                                 status=201)

    async def _delete(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        if self.stop_delay_s:
            await asyncio.sleep(self.stop_delay_s)
        self.stopped.append(sid)
        if self.sessions.pop(sid, None) is None:
            return web.json_response({"error": "session_not_found"}, status=404)
        return web.Response(status=204)


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler], port: int = 0) -> Iterator[str]:
    """``handler`` answering on a loopback port (any free one by default) from a thread, for code under test that
    makes its own blocking HTTP calls; yields the base URL, and stops the server on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
