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
from tests.conftest import ADMIN_AUTH, heartbeat, hub_settings, refresh, register


@pytest.fixture
async def cluster_hub(redis_cluster: list[EmbeddedRedis]) -> AsyncIterator[httpx.AsyncClient]:
    url = f"redis+cluster://127.0.0.1:{redis_cluster[0].port}"
    app = create_app(hub_settings(url, rate_limit_per_s=5, rate_limit_burst=100))
    async with app.router.lifespan_context(app):
        await app.state.hub.store.redis.flushall(target_nodes="primaries")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hub") as client:
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
