"""Fault injection with real hub processes and a real Redis: bursts across hubs, a hub SIGKILLed mid-burst.

Workers here are fake endpoints in the test process (hundreds of real agents would not fit the machine); they
enforce their own capacity and heartbeat the sessions they really hold, like the real agent.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest

from shared import keys
from tests.conftest import WORKER_AUTH, registration, sync_redis
from tests.fakes import FakeWorker
from tests.harness import HubProcess, running_hubs


@pytest.fixture
def three_hubs(redis_url: str, request: pytest.FixtureRequest) -> Iterator[list[HubProcess]]:
    # The fake workers share this process's event loop with every client coroutine, so during the big burst they
    # answer slowly; that test gives dispatches more time. The kill test needs short leases to watch them expire.
    # (By the test's own name: the kill test's name says "mid_burst", and matching "burst" gave it 16 s leases, which
    # outlive its 6.8 s of heartbeats whenever a reservation's dispatch had not reached its worker at the kill.)
    dispatch_s = 15 if request.node.name.startswith("test_burst_of_1000") else 5
    with running_hubs(3, redis_url, worker_ttl_s=60, dispatch_timeout_s=dispatch_s,
                      pending_lease_s=dispatch_s + 1, absent_grace_s=1) as hubs:
        yield hubs


async def _register_all(http: httpx.AsyncClient, hub: HubProcess, workers: list[FakeWorker]) -> list[str]:
    secrets = []
    for i, w in enumerate(workers):
        resp = await http.post(f"{hub.url}/api/v1/workers", headers=WORKER_AUTH,
                               json=registration(f"w-{i:03d}", w.url, max_streams=w.max_streams))
        assert resp.status_code == 200, resp.text
        secrets.append(resp.json()["worker_secret"])
    return secrets


async def _heartbeat_all(http: httpx.AsyncClient, hub: HubProcess, workers: list[FakeWorker],
                         secrets: list[str]) -> list[dict[str, Any]]:
    """What the agent does: report real sessions, stop the ones the hub says it does not hold."""
    replies = []
    for i, w in enumerate(workers):
        resp = await http.post(f"{hub.url}/api/v1/workers/w-{i:03d}/heartbeat",
                               json={"active_sessions": list(w.sessions)},
                               headers={**WORKER_AUTH, "X-Worker-Secret": secrets[i]})
        reply = resp.json()
        for sid in reply["stop_sessions"]:
            w.sessions.pop(sid, None)
        replies.append(reply)
    return replies


async def test_burst_of_1000_across_three_hubs_fills_exactly_the_free_capacity(
    three_hubs: list[HubProcess], make_worker, redis_url: str
) -> None:
    workers = [await make_worker(max_streams=5) for _ in range(20)]
    async with httpx.AsyncClient(timeout=30) as http:
        await _register_all(http, three_hubs[0], workers)
    await asyncio.sleep(0.5)
    # aiohttp, not httpx: httpx's pool rescans every waiting request against every connection, which made the
    # client, not the hubs, the bottleneck of a 1000-request burst (30 s of the test's CPU in httpcore).
    connector = aiohttp.TCPConnector(limit=300, force_close=True)  # no stale keep-alive reuse
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http_burst:
        answers = await asyncio.gather(*[
            _post_json(http_burst, f"{three_hubs[n % 3].url}/api/v1/sessions",
                       {"location": {"lat": 40, "lon": -70 + n % 90}})
            for n in range(1000)
        ])
    codes = Counter(status for status, _, _ in answers)
    errors = Counter(body["error"] for status, body, _ in answers if status != 201)
    assert codes == {201: 100, 503: 900}, (codes, errors, [hub.log_tail(20000) for hub in three_hubs])
    # Every refusal is a clean "try again": no_capacity, or store_unavailable when a Redis pool wait times out
    # on an overloaded machine. Either way the count of placements above is exact.
    refusals = [(body, headers) for status, body, headers in answers if status == 503]
    assert {body["error"] for body, _ in refusals} <= {"no_capacity", "store_unavailable"}
    assert all(int(headers["Retry-After"]) >= 1 for _, headers in refusals)
    assert all(w.peak <= w.max_streams for w in workers)  # the workers' own lists, not only Redis
    assert [w.refused_full for w in workers] == [0] * len(workers)  # never sent more than a worker's slots
    r = sync_redis(redis_url)
    assert sum(r.zcard(keys.worker_keys(f"w-{i:03d}").leases) for i in range(20)) == 100


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_hub_killed_mid_burst_leaves_nothing_half_made(
    three_hubs: list[HubProcess], make_worker, redis_url: str
) -> None:
    workers = [await make_worker(max_streams=4, delay_s=0.4) for _ in range(10)]  # dispatches in flight for 0.4 s
    victim, survivor = three_hubs[0], three_hubs[1]
    async with httpx.AsyncClient(timeout=30) as http:
        secrets = await _register_all(http, survivor, workers)
        await asyncio.sleep(0.5)
        burst = [asyncio.create_task(http.post(f"{victim.url}/api/v1/sessions", json={})) for _ in range(30)]
        await asyncio.sleep(0.25)
        victim.kill()  # SIGKILL while reservations are pending and dispatches are on the wire
        results = await asyncio.gather(*burst, return_exceptions=True)
        assert any(isinstance(r, httpx.HTTPError) for r in results)  # some requests really died with the hub

        # Within the pending-lease TTL (6 s) every unconfirmed slot either returned or was adopted by a heartbeat.
        assert float(survivor.env["FLEET_PENDING_LEASE_S"]) <= 6  # shorter than the heartbeats below
        r = sync_redis(redis_url, decode_responses=True)
        for _ in range(4):
            await asyncio.sleep(1.7)
            await _heartbeat_all(http, survivor, workers, secrets)
        for i, w in enumerate(workers):
            held = set(r.zrange(keys.worker_keys(f"w-{i:03d}").leases, 0, -1))
            assert held == set(w.sessions), f"w-{i:03d}: redis {held} != worker {set(w.sessions)}"
            assert r.hlen(keys.worker_keys(f"w-{i:03d}").active) == len(w.sessions)  # nothing left pending

        # The surviving hubs place the remaining capacity exactly.
        free = sum(w.max_streams - len(w.sessions) for w in workers)
        for w in workers:
            w.delay_s = 0
        await asyncio.sleep(0.3)
        more = await asyncio.gather(*[http.post(f"{three_hubs[1 + n % 2].url}/api/v1/sessions", json={})
                                      for n in range(free + 10)])
        assert Counter(m.status_code for m in more) == {201: free, 503: 10}
