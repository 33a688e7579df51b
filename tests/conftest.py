"""Shared fixtures: real Redis per test session (flushed per test), hubs in-process, fake workers.

Every test that uses ``redis_url`` runs twice: against one redis-server and against a 3-master Redis Cluster
(the same binary with ``cluster-enabled yes``), so a cross-slot script or a command the cluster client routes
differently fails a test. A test that must stop the server (an outage) is marked ``standalone_redis``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
import uvicorn

import shared.redis_server
from hub.main import create_app, websocket_max_bytes
from hub.redis_client import connect
from hub.settings import HubSettings
from hub.store import FleetStore
from shared.models import WorkerRegistration
from shared.redis_server import EmbeddedRedis, free_port
from tests.fakes import FakeWorker
from tests.redis_cluster import start_cluster

WORKER_TOKEN = "test-worker-token"
ADMIN_TOKEN = "test-admin-token"
WORKER_AUTH = {"Authorization": f"Bearer {WORKER_TOKEN}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

for name in [n for n in os.environ if n.startswith("FLEET_")]:
    del os.environ[name]  # tests configure themselves; a developer's shell must not leak in


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


REDIS_KINDS = ["standalone", "cluster"]


def pytest_configure(config: pytest.Config) -> None:
    _own_share_of_the_port_range()
    config.addinivalue_line("markers", "standalone_redis: runs on the single redis-server only (it stops or "
                                       "restarts the server to make an outage)")


def _own_share_of_the_port_range() -> None:
    """Each test process picks ports in its own share of the range, and the processes the tests start (a demo's or a
    hub's embedded redis-server) in a part apart from every share. Picking is a check and then a bind: two test
    processes once picked the same run between the two (the demo's hub found its port taken), and a child picking
    from a test's share could take a port the test has picked for a process it has yet to start."""
    full = shared.redis_server.ALL_PORTS
    children = range(full.stop - len(full) // 5, full.stop)
    os.environ[shared.redis_server.PORT_RANGE_VARIABLE] = f"{children.start}-{children.stop}"
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    index, count = int(worker[2:]), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = (children.start - full.start) // count
    shared.redis_server.PORT_RANGE = range(full.start + index * share, full.start + (index + 1) * share)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_url" in metafunc.fixturenames:
        kinds = ["standalone"] if metafunc.definition.get_closest_marker("standalone_redis") else REDIS_KINDS
        metafunc.parametrize("redis_url", kinds, indirect=True, scope="function")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[list[EmbeddedRedis]]:
    nodes = start_cluster(3)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> str:
    """URL of an empty Redis: the single server, or (``[cluster]`` tests) the 3-master cluster."""
    if getattr(request, "param", "standalone") == "cluster":
        nodes: list[EmbeddedRedis] = request.getfixturevalue("redis_cluster")
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
    else:
        if not redis_server.running:  # a test may have stopped it to simulate an outage
            redis_server.start()
        url = redis_server.url
    flush(sync_redis(url))
    return url


def is_cluster(url: str) -> bool:
    return "+cluster://" in url


_opened: list[redis.Redis | redis.RedisCluster] = []


def sync_redis(url: str, **kwargs: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking client for tests to look inside Redis, of the right kind for ``url``; closed when the test that
    opened it ends."""
    client: redis.Redis | redis.RedisCluster
    if is_cluster(url):
        client = redis.RedisCluster.from_url(url.replace("+cluster://", "://"), **kwargs)
    else:
        client = redis.Redis.from_url(url, **kwargs)
    _opened.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_the_redis_clients_the_test_opened() -> Iterator[None]:
    """A test process runs a thousand tests: a few sockets left open by each (``RedisCluster.close`` leaves its
    nodes' pools connected until garbage collection) once used up a 1,024-descriptor limit, and a test that opens
    240 sockets at once then saw its connections stall."""
    yield
    while _opened:
        client = _opened.pop()
        if isinstance(client, redis.RedisCluster):
            client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
        client.close()


def async_redis(url: str, **kwargs: Any) -> aioredis.Redis | aioredis.RedisCluster:
    if is_cluster(url):
        return aioredis.RedisCluster.from_url(url.replace("+cluster://", "://"), **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)


def flush(client: redis.Redis | redis.RedisCluster) -> None:
    if isinstance(client, redis.RedisCluster):
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    else:
        client.flushall()


def hub_settings(redis_url: str, **overrides: Any) -> HubSettings:
    values: dict[str, Any] = dict(
        redis_url=redis_url, worker_token=WORKER_TOKEN, admin_token=ADMIN_TOKEN,
        heartbeat_interval_s=0.5, worker_ttl_s=2.0, dispatch_timeout_s=1.0, pending_lease_s=2.5,
        active_lease_s=3.0, absent_grace_s=0.5, snapshot_refresh_s=0.2, rate_limit_per_s=0,
    )
    values.update(overrides)
    return HubSettings(**values)


HubClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_hub(redis_url: str) -> AsyncIterator[HubClientFactory]:
    """Factory of in-process hubs (app + lifespan) sharing the test Redis; all closed at the end."""
    closers: list[Any] = []

    async def factory(**overrides: Any) -> httpx.AsyncClient:
        app = create_app(hub_settings(redis_url, **overrides))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub")
        client.app = app  # type: ignore[attr-defined]
        closers.append((client, lifespan))
        return client

    yield factory
    for client, lifespan in reversed(closers):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def hub(make_hub: HubClientFactory) -> httpx.AsyncClient:
    return await make_hub()


@pytest.fixture
async def make_worker() -> AsyncIterator[Callable[..., Awaitable[FakeWorker]]]:
    made: list[FakeWorker] = []

    async def factory(**kwargs: Any) -> FakeWorker:
        worker = await FakeWorker(token=WORKER_TOKEN, **kwargs).start()
        made.append(worker)
        return worker

    yield factory
    for worker in made:
        await worker.stop()



async def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test if it has not within ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)

def registration(worker_id: str, url: str, region: str = "us-east-1", max_streams: int = 5,
                 **extra: Any) -> dict[str, Any]:
    return {"worker_id": worker_id, "url": url, "region": region, "max_streams": max_streams,
            "gpus": [{"name": "NVIDIA A10G", "vram_total_mb": 24576}], **extra}


async def registered_store(redis_url: str, count: int, max_streams: int = 5,
                           **overrides: Any) -> tuple[FleetStore, dict[str, str]]:
    """A store of its own (hub settings ``overrides``) over ``count`` workers registered through a hub's registry
    (secrets by worker id)."""
    app = create_app(hub_settings(redis_url))
    secrets: dict[str, str] = {}
    async with app.router.lifespan_context(app):
        registry = app.state.hub.registry
        for i in range(count):
            reg = WorkerRegistration(**registration(f"w-{i:03d}", f"http://127.0.0.1:1/w{i}", max_streams=max_streams))
            secrets[reg.worker_id] = (await registry.register(reg, None)).worker_secret
    settings = hub_settings(redis_url, **overrides)
    return FleetStore(connect(settings, redis_url), settings), secrets


async def register(hub: httpx.AsyncClient, worker_id: str, worker: FakeWorker, **kwargs: Any) -> dict[str, Any]:
    """Register and send a first heartbeat; returns the registration answer (with the worker secret)."""
    resp = await hub.post("/api/v1/workers", json=registration(worker_id, worker.url, max_streams=worker.max_streams,
                                                               **kwargs), headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    await heartbeat(hub, worker_id, answer["worker_secret"], list(worker.sessions))
    return answer


async def heartbeat(hub: httpx.AsyncClient, worker_id: str, secret: str, sessions: list[str],
                    **fields: Any) -> httpx.Response:
    return await hub.post(f"/api/v1/workers/{worker_id}/heartbeat", json={"active_sessions": sessions, **fields},
                          headers={**WORKER_AUTH, "X-Worker-Secret": secret})


async def heartbeat_of(hub: httpx.AsyncClient, worker_id: str, secret: str, worker: FakeWorker) -> dict[str, Any]:
    """The hub's answer to the heartbeat ``worker`` would send now: what it runs, numbered as it numbers them."""
    seq, running = worker.snapshot()
    answer: dict[str, Any] = (await heartbeat(hub, worker_id, secret, running, seq=seq)).json()
    return answer


async def refresh(hub: httpx.AsyncClient) -> None:
    """Make the hub re-read the routing board now instead of waiting for its loop."""
    await hub.app.state.hub.board.refresh()  # type: ignore[attr-defined]


class RunningHub:
    """An in-process hub served by uvicorn on a real port (for WebSockets and real HTTP clients); it can be
    stopped and started again on the same port to simulate an outage."""

    def __init__(self, redis_url: str, **overrides: Any) -> None:
        self.redis_url = redis_url
        self.overrides = overrides
        self.port = free_port()
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RunningHub:
        settings = hub_settings(self.redis_url, **self.overrides)
        app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ws_max_size=websocket_max_bytes(settings)))  # as `fleet hub`
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self.server and self.task:
            self.server.should_exit = True
            await self.task
            self.server = self.task = None

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=5)


@pytest.fixture
async def make_running_hub(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[RunningHub]]]:
    hubs: list[RunningHub] = []

    async def factory(**overrides: Any) -> RunningHub:
        hub = await RunningHub(redis_url, **overrides).start()
        hubs.append(hub)
        return hub

    yield factory
    for hub in hubs:
        await hub.stop()
