"""The hub application: built by ``create_app``; the lifespan opens and always closes what it uses."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from hub.allocator import Allocator
from hub.api import admin, dashboard, errors, ops, sessions, workers
from hub.api.deps import HubState
from hub.api.middleware import ClientRoutesCors, HeadAsGet
from hub.board import RoutingBoard
from hub.cloudwatch import CapacityPublisher, make_cloudwatch_client, regional_clients
from hub.dispatch import WorkerClient
from hub.metrics import HubMetrics
from hub.redis_client import connect
from hub.registry import Registry
from hub.settings import HubSettings
from hub.store import FleetStore
from hub.tasks import BackgroundTasks, run_every
from shared.aio import cancel_and_wait
from shared.body_limit import BodySizeLimit
from shared.models import MAX_HEARTBEAT_BYTES
from shared.redis_server import EmbeddedRedis

log = logging.getLogger(__name__)

API_DESCRIPTION = """
Control plane for a fleet of GPU workers serving real-time AI avatar and voice sessions.

* **Clients** ask `POST /api/v1/sessions` for a session config (worker, LiveKit region and token).
* **Workers** register, heartbeat and deregister with `Authorization: Bearer $FLEET_WORKER_TOKEN` plus the
  `X-Worker-Secret` their registration returned.
* **SREs** inspect and steer the registry with `Authorization: Bearer $FLEET_ADMIN_TOKEN`.

Every error body is `{"error": code, "message": text}`.
"""


def websocket_max_bytes(settings: HubSettings) -> int:
    """The largest WebSocket message the server reads (uvicorn's ``ws_max_size``). The heartbeat channel, the one
    WebSocket route, refuses messages over ``MAX_HEARTBEAT_BYTES`` itself, with a reason; uvicorn's bound sits just
    above it, so only a larger message is cut without one."""
    return max(settings.max_body_bytes, MAX_HEARTBEAT_BYTES) + 4096


def _operation_id(route: APIRoute) -> str:
    """Each operation's id is its handler's name (``create_session``): what a client generated from the contract
    calls its methods, rather than FastAPI's ``create_session_api_v1_sessions_post``."""
    return route.name


def create_app(settings: HubSettings | None = None) -> FastAPI:
    settings = settings or HubSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded: EmbeddedRedis | None = None
        url = settings.redis_url
        if not url:
            embedded = EmbeddedRedis().start()
            url = embedded.url
            log.warning("FLEET_REDIS_URL is unset: started an embedded redis-server on %s, "
                        "for a single local hub only", url)
        store = FleetStore(connect(settings, url), settings)
        board = RoutingBoard(store, ttl_ms=settings.ttl_ms, retention_ms=int(settings.retention_s * 1000),
                             policy=settings.policy,
                             weights=settings.weights,
                             near_best_margin=settings.near_best_margin)
        metrics = HubMetrics()
        metrics.watch_board(board)
        background = BackgroundTasks()
        worker_client = WorkerClient(settings.worker_token.get_secret_value(), settings.dispatch_timeout_s)
        app.state.hub = HubState(
            settings=settings, store=store, board=board, metrics=metrics,
            registry=Registry(settings, store, board, metrics, worker_client, background),
            allocator=Allocator(settings, store, board, worker_client, metrics, background),
        )
        loops = [asyncio.create_task(run_every(settings.snapshot_refresh_s, board.refresh, "routing board refresh"),
                                     name="routing board refresh")]
        if settings.cloudwatch_enabled:
            publisher = CapacityPublisher(
                store.redis, app.state.hub.registry.capacity, settings.cloudwatch_namespace,
                settings.cloudwatch_interval_s, make_cloudwatch_client(settings.cloudwatch_region),
                cloudwatch_for_region=regional_clients(), worker_regions=settings.cloudwatch_worker_regions)
            loops.append(asyncio.create_task(run_every(settings.cloudwatch_interval_s, publisher.publish_once,
                                                       "cloudwatch capacity"), name="cloudwatch capacity"))
        # Everything built so far (modules, routes, schemas, clients) lives as long as the process. Moved out of the
        # collector's generations, full collections stop re-scanning it: at 10,000 workers this took an
        # allocation's p99 from 119 to 49 ms and its hub CPU from 1.98 to 1.60 ms (BENCHMARKS.md).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # an app stopped inside a longer-lived process (tests) leaves nothing uncollectable
            await cancel_and_wait(*loops)
            await background.aclose()
            await worker_client.aclose()
            await store.close()
            if embedded is not None:
                embedded.cleanup()

    # No redirect from a path with a trailing slash: behind a TLS-terminating load balancer it pointed the client
    # at http://, and it answered an empty 307 instead of an error body.
    app = FastAPI(title="gpu-fleet hub", version="1.0.0", description=API_DESCRIPTION, lifespan=lifespan,
                  generate_unique_id_function=_operation_id, redirect_slashes=False)
    if settings.cors_origins:  # innermost, so that CORS answers its 500s too
        app.add_middleware(errors.UnexpectedErrorsInside)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       larger_for={"/heartbeat": max(settings.max_body_bytes, MAX_HEARTBEAT_BYTES)})
    app.add_middleware(HeadAsGet)
    if settings.cors_origins:  # outermost: a preflight is answered before any route is looked for
        app.add_middleware(ClientRoutesCors, origins=settings.cors_origins, prefix=sessions.router.prefix)
    errors.install(app)
    for router in (sessions.router, workers.router, workers.channel_router, admin.router, ops.router, dashboard.router):
        app.include_router(router)
    return app
