"""Fault injection with REAL processes end to end: a real Redis (the single server; the burst and the killed worker
also on the 3-master cluster), three `fleet hub` and eight `fleet worker` processes (synthetic engine, simulated
T4s, 4 streams each) talking over loopback HTTP.

Where tests/test_faults.py uses fake worker endpoints, here every session really runs in a worker process, every
heartbeat is the agent's own, and the truth about a worker is its own ``GET /sessions`` (worker token auth). The
fleet is started once for the module (process start-up is most of the cost on two cores); a per-test fixture puts
it back in a known state: Redis up, every worker registered, no session anywhere.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared import keys
from shared.redis_server import EmbeddedRedis
from tests.conftest import ADMIN_AUTH, WORKER_AUTH, flush, sync_redis
from tests.harness import HubProcess, WorkerProcess, running_hubs, running_workers

ROOT = Path(__file__).resolve().parents[1]
TTL_S = 2.0
#: Short heartbeats and TTL so faults show within seconds; a generous dispatch timeout because eleven Python
#: processes share two cores (a timed-out dispatch would only cost a slot, but the burst counts slots exactly);
#: an active lease that outlives the Redis outage of the restart test. The absent grace stays well above the hubs'
#: event-loop lag during the burst (measured up to ~1 s on two busy cores): for a worker that does not number its
#: heartbeats, a snapshot taken before a dispatch but processed more than the grace after its confirmation would
#: release a live session (numbered heartbeats, which `fleet worker` sends, are not subject to the grace).
HUB_TIMINGS: dict[str, Any] = dict(heartbeat_interval_s=0.5, worker_ttl_s=TTL_S, dispatch_timeout_s=5.0,
                                   pending_lease_s=6.0, active_lease_s=10.0, absent_grace_s=3.0)
WORKERS, STREAMS = 8, 4


@dataclass
class Fleet:
    redis_url: str
    hubs: list[HubProcess]
    workers: list[WorkerProcess]
    server: EmbeddedRedis | None  # the standalone server the restart tests stop; None on the cluster

    @property
    def capacity(self) -> int:
        return sum(w.max_streams for w in self.workers)

    def store(self) -> redis.Redis | redis.RedisCluster:
        return sync_redis(self.redis_url, decode_responses=True)

    @property
    def standalone(self) -> EmbeddedRedis:
        assert self.server is not None, "a restart test runs on the standalone server only"
        return self.server


#: Tests that stop and restart the Redis server run on the standalone one only.
STANDALONE_ONLY = pytest.mark.parametrize("fleet_processes", ["standalone"], indirect=True)


@pytest.fixture(scope="module", params=["standalone", "cluster"])
def fleet_processes(request: pytest.FixtureRequest, redis_server: EmbeddedRedis) -> Iterator[Fleet]:
    """The fleet on the single server or on the 3-master cluster (pytest runs one fleet's tests, then the other's)."""
    server: EmbeddedRedis | None = None
    if request.param == "cluster":
        nodes: list[EmbeddedRedis] = request.getfixturevalue("redis_cluster")
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
    else:
        if not redis_server.running:
            redis_server.start()
        server, url = redis_server, redis_server.url
    flush(sync_redis(url))
    with running_hubs(3, url, **HUB_TIMINGS) as hubs, \
            running_workers([h.url for h in hubs], WORKERS, max_streams=STREAMS, drain_timeout_s=2,
                            log_level="INFO") as workers:
        yield Fleet(url, hubs, workers, server)


@pytest.fixture
async def fleet(fleet_processes: Fleet) -> Fleet:
    """The shared fleet, reset: Redis up, every worker process running and registered, no session anywhere."""
    f = fleet_processes
    if f.server is not None and not f.server.running:  # a failed outage test
        f.server.start()
    for w in f.workers:
        if not w.running:  # a failed kill test
            await asyncio.to_thread(w.start)
    async with httpx.AsyncClient(timeout=10) as http:
        await wait_until(lambda: _all_ready(http, f), 20, "every hub ready and every worker alive")
        held = (await http.get(f"{f.hubs[0].url}/api/v1/sessions", headers=ADMIN_AUTH)).json()["sessions"]
        await asyncio.gather(*(http.delete(f"{f.hubs[0].url}/api/v1/sessions/{s['session_id']}") for s in held))
        await wait_until(lambda: _empty(http, f), 15, "no session on any worker nor in Redis")
    return f


async def _all_ready(http: httpx.AsyncClient, f: Fleet) -> bool:
    for hub in f.hubs:
        if (await http.get(f"{hub.url}/ready")).status_code != 200:
            return False
    for hub in f.hubs:  # the listing refreshes that hub's routing mirror first
        views = (await http.get(f"{hub.url}/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
        if not {v["worker_id"] for v in views if v["alive"] and v["state"] == "ready"} >= {
                w.worker_id for w in f.workers}:
            return False
    return True


async def _registered_in_redis(f: Fleet) -> bool:
    r = f.store()
    return all(r.exists(keys.worker_keys(w.worker_id).info) for w in f.workers)


async def _empty(http: httpx.AsyncClient, f: Fleet) -> bool:
    r = f.store()
    for w in f.workers:
        if await own_sessions(http, w) or r.zcard(keys.worker_keys(w.worker_id).leases):
            return False
    return True


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll until true; returns the seconds it took."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def own_sessions(http: httpx.AsyncClient, w: WorkerProcess) -> set[str]:
    """What the worker process itself runs: its GET /sessions."""
    resp = await http.get(f"{w.url}/sessions", headers=WORKER_AUTH)
    assert resp.status_code == 200, resp.text
    return {s["session_id"] for s in resp.json()}


async def redis_matches_workers(http: httpx.AsyncClient, f: Fleet) -> bool:
    """Redis's leases of each worker (all confirmed, none pending) are exactly the sessions the worker runs."""
    r = f.store()
    for w in f.workers:
        k = keys.worker_keys(w.worker_id)
        own = await own_sessions(http, w)
        if set(r.zrange(k.leases, 0, -1)) != own or r.hlen(k.active) != len(own):
            return False
    return True


def hub_used_slots(f: Fleet) -> int:
    return sum(f.store().zcard(keys.worker_keys(w.worker_id).leases) for w in f.workers)


async def place(http: httpx.AsyncClient, hub: HubProcess, **body: Any) -> httpx.Response:
    return await http.post(f"{hub.url}/api/v1/sessions", json=body)


def assert_clean_503(resp: httpx.Response, codes: set[str]) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"] in codes, resp.text
    assert int(resp.headers["Retry-After"]) >= 1


@pytest.mark.timeout(60)
async def test_burst_over_three_hubs_fills_exactly_the_free_capacity_of_real_workers(fleet: Fleet) -> None:
    """300 concurrent requests for 32 real slots: exactly 32 placed, every other answer a clean 503, and each worker's
    own list never above its max_streams (sampled throughout) and equal to what Redis holds for it."""
    peaks = dict.fromkeys((w.worker_id for w in fleet.workers), 0)
    done = asyncio.Event()

    async def watch(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            for w in fleet.workers:
                peaks[w.worker_id] = max(peaks[w.worker_id], len(await own_sessions(http, w)))
            await asyncio.sleep(0.02)

    limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, pool=None), limits=limits) as http:
        watcher = asyncio.create_task(watch(http))
        answers = await asyncio.gather(*(
            place(http, fleet.hubs[n % 3], location={"lat": 45 - n % 60, "lon": -120 + n % 140}) for n in range(300)
        ))
        done.set()
        await watcher
        codes = Counter(a.status_code for a in answers)
        assert codes == {201: fleet.capacity, 503: 300 - fleet.capacity}, (codes, [a.text for a in answers][:5])
        for a in answers:
            if a.status_code == 503:
                assert_clean_503(a, {"no_capacity", "store_unavailable"})
        placed = Counter(a.json()["worker"]["id"] for a in answers if a.status_code == 201)
        by_worker = {w.worker_id: await own_sessions(http, w) for w in fleet.workers}
        for w in fleet.workers:
            assert peaks[w.worker_id] <= w.max_streams, peaks
            assert len(by_worker[w.worker_id]) == placed[w.worker_id] == w.max_streams
            metrics = (await http.get(f"{w.url}/metrics")).text
            # The hub's reservations kept every dispatch within the worker's room: no worker had to refuse one.
            assert 'worker_dispatches_total{outcome="full"} 0.0' in metrics, (w.worker_id, metrics, w.log_tail())
        assert await redis_matches_workers(http, fleet)
        views = (await http.get(f"{fleet.hubs[1].url}/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]
        assert {v["worker_id"]: v["used_streams"] for v in views} == {k: len(v) for k, v in by_worker.items()}
        await asyncio.sleep(1.5)  # three heartbeats: reconciliation must keep every placed session
        assert {w.worker_id: await own_sessions(http, w) for w in fleet.workers} == by_worker


@pytest.mark.timeout(60)
async def test_a_killed_worker_leaves_routing_its_conversations_move_and_it_comes_back(fleet: Fleet) -> None:
    """SIGKILL a `fleet worker`: it leaves routing within the TTL; the same session_key is re-placed on a live
    worker while other conversations keep theirs; the same id restarted re-registers and takes sessions again."""
    async with httpx.AsyncClient(timeout=30) as http:
        first = await asyncio.gather(*(place(http, fleet.hubs[i % 3], session_key=f"conv-{i}") for i in range(16)))
        assert {a.status_code for a in first} == {201}, [a.text for a in first]
        home = {f"conv-{i}": (a.json()["session_id"], a.json()["worker"]["id"]) for i, a in enumerate(first)}
        counts = Counter(wid for _, wid in home.values())
        victim = next(w for w in fleet.workers if w.worker_id == counts.most_common(1)[0][0])
        moved = [key for key, (_, wid) in home.items() if wid == victim.worker_id]

        victim.kill()
        left_after = await wait_until(lambda: _routable_nowhere(http, fleet, victim.worker_id), TTL_S + 3,
                                      f"{victim.worker_id} to leave routing")
        assert left_after <= TTL_S + 1.0, left_after  # TTL plus one board refresh and polling slack

        for n, key in enumerate(moved):
            again = await place(http, fleet.hubs[n % 3], session_key=key)
            assert again.status_code == 201, again.text  # a new session, not the dead one
            new_sid, new_wid = again.json()["session_id"], again.json()["worker"]["id"]
            assert new_wid != victim.worker_id and new_sid != home[key][0]
            target = next(w for w in fleet.workers if w.worker_id == new_wid)
            assert new_sid in await own_sessions(http, target)
        kept = next(key for key, (_, wid) in home.items() if wid != victim.worker_id)
        same = await place(http, fleet.hubs[2], session_key=kept)
        assert same.status_code == 200 and same.json()["session_id"] == home[kept][0], same.text

        await asyncio.to_thread(victim.start)  # same id, same port
        await wait_until(lambda: _routable_everywhere(http, fleet, victim.worker_id), 10,
                         f"{victim.worker_id} routable on every hub")
        r = fleet.store()
        await wait_until(lambda: _as_sync(r.zcard(keys.worker_keys(victim.worker_id).leases) == 0), 5,
                         "the dead incarnation's leases released by the new one's heartbeats")
        free = fleet.capacity - hub_used_slots(fleet)
        fill = await asyncio.gather(*(place(http, fleet.hubs[i % 3]) for i in range(free)))
        assert {a.status_code for a in fill} == {201}, [a.text for a in fill]
        assert len(await own_sessions(http, victim)) == victim.max_streams  # it takes sessions again
        assert await redis_matches_workers(http, fleet)


async def _as_sync(value: bool) -> bool:
    return value


async def _routable_nowhere(http: httpx.AsyncClient, f: Fleet, worker_id: str) -> bool:
    for hub in f.hubs:
        view = (await http.get(f"{hub.url}/api/v1/workers/{worker_id}", headers=ADMIN_AUTH)).json()
        explain = (await http.get(f"{hub.url}/api/v1/route/explain", params={"limit": 100}, headers=ADMIN_AUTH)).json()
        if view["alive"] or worker_id in {c["worker_id"] for c in explain["candidates"]}:
            return False
    return True


async def _routable_everywhere(http: httpx.AsyncClient, f: Fleet, worker_id: str) -> bool:
    for hub in f.hubs:
        view = (await http.get(f"{hub.url}/api/v1/workers/{worker_id}", headers=ADMIN_AUTH)).json()
        explain = (await http.get(f"{hub.url}/api/v1/route/explain", params={"limit": 100}, headers=ADMIN_AUTH)).json()
        if not view["alive"] or view["state"] != "ready" or worker_id not in {c["worker_id"]
                                                                            for c in explain["candidates"]}:
            return False
    return True


@STANDALONE_ONLY
@pytest.mark.timeout(60)
async def test_redis_restart_hubs_refuse_cleanly_recover_and_workers_keep_their_sessions(fleet: Fleet) -> None:
    """Redis stops and comes back with its data (a restart with persistence, or a failover): meanwhile every hub
    answers 503 + Retry-After and /ready fails; afterwards the same hub processes serve again, the workers kept
    every session and their heartbeats re-announce them, so Redis's used slots equal the workers' real sessions."""
    async with httpx.AsyncClient(timeout=10) as http:
        first = await asyncio.gather(*(place(http, fleet.hubs[i % 3]) for i in range(12)))
        assert {a.status_code for a in first} == {201}
        before = {w.worker_id: await own_sessions(http, w) for w in fleet.workers}
        hub_pids = [h.proc.pid for h in fleet.hubs if h.proc]

        fleet.store().save()
        fleet.standalone.stop()
        outage_started = time.monotonic()
        for hub in fleet.hubs:
            assert_clean_503(await http.get(f"{hub.url}/ready"), {"store_unavailable"})
            assert_clean_503(await place(http, hub), {"store_unavailable", "no_capacity"})
        await asyncio.sleep(max(0.0, TTL_S + 0.5 - (time.monotonic() - outage_started)))  # longer than a TTL
        for w in fleet.workers:  # heartbeats have been failing for a while: sessions keep running
            assert await own_sessions(http, w) == before[w.worker_id]
        fleet.standalone.start()

        recovered = await wait_until(lambda: _all_ready(http, fleet), 10, "hubs ready again")
        await wait_until(lambda: redis_matches_workers(http, fleet), 10, "Redis to match every worker again")
        assert [h.proc.pid for h in fleet.hubs if h.proc] == hub_pids  # recovered without a restart
        after = {w.worker_id: await own_sessions(http, w) for w in fleet.workers}
        assert after == before, "a session was lost across the Redis restart"
        assert hub_used_slots(fleet) == sum(len(s) for s in after.values()) == 12
        more = await place(http, fleet.hubs[0])
        assert more.status_code == 201, (more.text, recovered)


@STANDALONE_ONLY
@pytest.mark.timeout(60)
async def test_redis_restarted_empty_workers_reregister_and_stop_what_it_forgot(fleet: Fleet) -> None:
    """Redis comes back EMPTY (README, "not guaranteed"): each worker is told it is unknown, registers again, and
    its re-announced sessions are ones the hub no longer holds, so it stops them; nothing is counted that does not
    run, and the fleet places sessions again at full capacity."""
    async with httpx.AsyncClient(timeout=10) as http:
        first = await asyncio.gather(*(place(http, fleet.hubs[i % 3]) for i in range(8)))
        assert {a.status_code for a in first} == {201}
        r = fleet.store()
        r.flushall()
        r.save()  # the restart below then loads an empty dataset
        fleet.standalone.stop()
        fleet.standalone.start()
        # Registered again means in Redis: a hub's mirror (and a worker's /health) can still show the worker as it
        # was before the wipe, and a burst routed on that view gets clean 503s until the mirror catches up.
        await wait_until(lambda: _registered_in_redis(fleet), 15, "every worker registered again")
        await wait_until(lambda: _all_ready(http, fleet), 15, "every hub to see the workers again")
        await wait_until(lambda: _empty(http, fleet), 10, "workers to stop the sessions Redis forgot")
        fill = await asyncio.gather(*(place(http, fleet.hubs[i % 3]) for i in range(fleet.capacity)))
        refused = [a.text for a in fill if a.status_code != 201][:2]
        views = [[(w["worker_id"], w["alive"], w["state"], w["used_streams"]) for w in
                  (await http.get(f"{hub.url}/api/v1/workers", headers=ADMIN_AUTH)).json()["workers"]]
                 for hub in fleet.hubs]  # what each hub's routing mirror saw, should this ever fail again
        logs = [hub.log_tail(3000) for hub in fleet.hubs] + [w.log_tail(1500) for w in fleet.workers]
        assert Counter(a.status_code for a in fill) == {201: fleet.capacity}, (refused, views, logs)
        assert await redis_matches_workers(http, fleet)


@pytest.mark.timeout(60)
def test_soak_quick_smoke() -> None:
    """bench/soak.py --quick end to end (the full soak is run by hand; figures in BENCHMARKS.md)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "bench.soak", "--quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=55)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "final check: PASS" in out.stdout, out.stdout



def test_hub_processes_without_a_redis_url_share_one_embedded_store() -> None:
    """Regression: `fleet hub --workers 2` in dev (no FLEET_REDIS_URL) started a redis-server per process, so a
    registration was known only to the process that took it, and listings alternated between it and nothing."""
    hub = HubProcess(None, processes=2).start()
    try:
        with httpx.Client(base_url=hub.url, timeout=5) as client:
            resp = client.post("/api/v1/workers", json={
                "worker_id": "w-1", "url": "http://127.0.0.1:1", "region": "us-east-1", "max_streams": 2,
                "gpus": [{"name": "NVIDIA A10G", "vram_total_mb": 24576}]}, headers=WORKER_AUTH)
            assert resp.status_code == 200, resp.text
        listed = []
        for _ in range(12):
            with httpx.Client(timeout=5) as client:  # a connection each: the kernel spreads them over the processes
                workers = client.get(f"{hub.url}/api/v1/workers", headers=ADMIN_AUTH).json()["workers"]
            listed.append([w["worker_id"] for w in workers])
        assert listed == [["w-1"]] * 12
        assert hub.log_tail(20000).count("started an embedded redis-server") == 1, hub.log_tail()
    finally:
        hub.stop()
