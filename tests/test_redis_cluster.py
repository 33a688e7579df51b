"""One whole flow, with rate limiting, on the 3-master Redis Cluster.

Every ``redis_url`` test also runs on the cluster (see conftest); this one adds the flows those do not cover.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from hub.main import create_app
from shared.redis_server import EmbeddedRedis
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, flush, heartbeat, hub_settings, refresh, register, sync_redis
from tests.redis_cluster import start_cluster


@pytest.fixture
async def cluster_hub(redis_cluster: list[EmbeddedRedis]) -> AsyncIterator[httpx.AsyncClient]:
    url = f"redis+cluster://127.0.0.1:{redis_cluster[0].port}"
    flush(sync_redis(url))  # before the hub starts: its first read of the board must not mirror an earlier test's
    app = create_app(hub_settings(url, rate_limit_per_s=5, rate_limit_burst=100))
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


async def test_every_flow_runs_on_a_cluster(cluster_hub: httpx.AsyncClient, make_worker) -> None:
    hub = cluster_hub
    workers = [await make_worker(max_streams=2) for _ in range(4)]
    regs = [await register(hub, f"w-{i}", w, region=["us-east-1", "us-west-2"][i % 2]) for i, w in enumerate(workers)]
    await refresh(hub)

    placed = [await hub.post("/api/v1/sessions", json={"session_key": f"k{n}"}) for n in range(8)]
    assert [p.status_code for p in placed] == [201] * 8
    assert (await hub.post("/api/v1/sessions", json={})).status_code == 503
    again = await hub.post("/api/v1/sessions", json={"session_key": "k3"})
    assert again.status_code == 200 and again.json()["session_id"] == placed[3].json()["session_id"]

    sid = placed[0].json()["session_id"]
    assert (await hub.get(f"/api/v1/sessions/{sid}")).status_code == 200
    assert (await hub.delete(f"/api/v1/sessions/{sid}")).status_code == 204

    for i, w in enumerate(workers):  # heartbeats reconcile on every node's slots
        reply = await heartbeat(hub, f"w-{i}", regs[i]["worker_secret"], list(w.sessions))
        assert reply.status_code == 200
        assert reply.json()["used_streams"] == len(w.sessions)

    assert (await hub.post("/api/v1/workers/w-1/drain", headers=ADMIN_AUTH)).json()["state"] == "draining"
    listed = (await hub.get("/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]
    assert len(listed) == 7
    fleet = (await hub.get("/api/v1/fleet", headers=ADMIN_AUTH)).json()
    assert fleet["total"]["used_streams"] == 7
    assert (await hub.get("/ready")).status_code == 200
    await asyncio.sleep(0)


async def test_a_cluster_that_cannot_be_reached_answers_503_and_recovers(make_worker) -> None:
    """Every node down: the cluster client raises its own exception ("cannot be connected"), not a connection
    error. That is the store being unavailable (503 with Retry-After, the channel stays open), not a hub bug."""
    nodes = start_cluster(3)
    try:
        app = create_app(hub_settings(f"redis+cluster://127.0.0.1:{nodes[0].port}"))
        async with app.router.lifespan_context(app), \
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as hub:
            worker = await make_worker()
            secret = (await register(hub, "w-1", worker))["worker_secret"]
            for node in nodes:
                node.stop()
            try:
                for method, path, kwargs in [
                    ("POST", "/api/v1/sessions", {"json": {}}),
                    ("GET", "/api/v1/fleet", {"headers": ADMIN_AUTH}),
                    ("POST", "/api/v1/workers/w-1/heartbeat",
                     {"json": {}, "headers": {**WORKER_AUTH, "X-Worker-Secret": secret}}),
                ]:
                    resp = await hub.request(method, path, **kwargs)
                    assert resp.status_code == 503, (path, resp.text)
                    assert resp.json()["error"] == "store_unavailable" and "Retry-After" in resp.headers
                assert (await hub.get("/ready")).status_code == 503
            finally:
                for node in nodes:
                    node.start()
            for _ in range(100):
                if (await hub.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await hub.get("/ready")).status_code == 200
    finally:
        for node in nodes:
            node.cleanup()
