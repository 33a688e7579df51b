"""Many hub processes, one Redis: a slot is never given twice, and every refusal is a clean 503."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hub.store import FleetStore
from shared import keys
from tests.conftest import WORKER_AUTH, registered_store, registration, sync_redis
from tests.harness import HubProcess, running_hubs


@pytest.fixture
def two_hubs(redis_url: str) -> Iterator[list[HubProcess]]:
    with running_hubs(2, redis_url, worker_ttl_s=30, dispatch_timeout_s=5, pending_lease_s=10) as hubs:
        yield hubs


async def test_200_concurrent_requests_over_two_hubs_fill_exactly_100_slots(
    two_hubs: list[HubProcess], make_worker, redis_url: str
) -> None:
    workers = [await make_worker(max_streams=5) for _ in range(20)]
    async with httpx.AsyncClient(timeout=30) as http:
        for i, w in enumerate(workers):
            reg = await http.post(f"{two_hubs[i % 2].url}/api/v1/workers",
                                  json=registration(f"w-{i:02d}", w.url, region=["us-east-1", "eu-central-1"][i % 2]),
                                  headers=WORKER_AUTH)
            assert reg.status_code == 200, reg.text
        await asyncio.sleep(0.5)  # both hubs' routing boards have refreshed

        answers = await asyncio.gather(*[
            http.post(f"{two_hubs[n % 2].url}/api/v1/sessions",
                      json={"location": {"lat": 48.0 + n % 7, "lon": -70.0 + (n % 11) * 8}})
            for n in range(200)
        ])

    codes = Counter(a.status_code for a in answers)
    assert codes == {201: 100, 503: 100}, codes
    assert all(a.json()["error"] == "no_capacity" and "Retry-After" in a.headers
               for a in answers if a.status_code == 503)
    placed = [a.json() for a in answers if a.status_code == 201]
    assert len({p["session_id"] for p in placed}) == 100
    # The workers' own view, not only Redis: nobody ever ran more than max_streams.
    assert all(w.peak <= 5 for w in workers)
    assert [w.refused_full for w in workers] == [0] * 20  # the hub never sent a worker more than its slots
    assert sum(len(w.sessions) for w in workers) == 100
    r = sync_redis(redis_url, decode_responses=True)
    for i in range(20):
        assert r.zcard(keys.worker_keys(f"w-{i:02d}").leases) == len(workers[i].sessions)


def _batch_sizes(store: FleetStore) -> list[int]:
    """From now on, the number of session steps in each pipeline ``store`` sends, in order."""
    batches: list[int] = []
    commit = store._commit_steps

    async def counting(steps: list[Any]) -> list[Any]:
        batches.append(len(steps))
        return await commit(steps)

    store._steps._flush = counting  # type: ignore[assignment]
    return batches


async def test_concurrent_session_steps_share_round_trips_and_never_overbook(redis_url: str) -> None:
    """Reservations, confirmations and releases of concurrent requests share pipelines; each script stays atomic,
    so 120 reservations for 40 slots still take exactly 40, whatever batches they land in."""
    store, _ = await registered_store(redis_url, 8, max_streams=5)
    batches = _batch_sizes(store)
    try:
        taken = await asyncio.gather(*(store.reserve(f"w-{n % 8:03d}", f"w-{n % 8:03d}~s{n:04d}", {"n": n})
                                       for n in range(120)))
        won = [(f"w-{n % 8:03d}", f"w-{n % 8:03d}~s{n:04d}") for n, t in enumerate(taken) if t.ok]
        assert len(won) == 40 and Counter(w for w, _ in won) == dict.fromkeys((f"w-{i:03d}" for i in range(8)), 5)
        assert {t.reason for t in taken if not t.ok} == {"full"}
        assert len(batches) < 60, batches  # 120 steps, far fewer round trips

        sync_redis(redis_url).script_flush()  # a restart or failover: every script is gone at once
        confirmed = await asyncio.gather(*(store.confirm(w, sid) for w, sid in won[:20]))
        released = await asyncio.gather(*(store.release(w, sid) for w, sid in won[20:]))
        assert all(confirmed) and all(r.held for r in released)
        retaken = await asyncio.gather(*(store.reserve(w, f"{w}~again{n}", {}) for n, (w, _) in enumerate(won[20:])))
        assert all(t.ok for t in retaken)
    finally:
        await store.close()
    r = sync_redis(redis_url, decode_responses=True)
    assert sum(r.zcard(keys.worker_keys(f"w-{i:03d}").leases) for i in range(8)) == 40
    assert sum(r.hlen(keys.worker_keys(f"w-{i:03d}").active) for i in range(8)) == 20
    # Each batch also wrote the slot counts it changed to the routing board, the last one of each worker winning.
    assert r.hgetall(keys.BOARD.used) == {f"w-{i:03d}": str(r.zcard(keys.worker_keys(f"w-{i:03d}").leases))
                                          for i in range(8)}
    assert all(json.loads(v)["state"] == "ready" for v in r.hgetall(keys.BOARD.status).values()), "status kept"


async def test_one_batch_of_different_steps_reloads_every_script_redis_lost(redis_url: str) -> None:
    """After a restart or failover every script is gone at once; a batch that mixes reservations, confirmations and
    releases must load each of them, not only the first one it misses (the others' steps were 500s)."""
    store, _ = await registered_store(redis_url, 3, max_streams=2)
    try:
        assert (await store.reserve("w-001", "w-001~toconfirm", {})).ok
        assert (await store.reserve("w-002", "w-002~torelease", {})).ok
        sync_redis(redis_url).script_flush()
        batches = _batch_sizes(store)
        reserved, confirmed, released = await asyncio.gather(
            store.reserve("w-000", "w-000~afterloss", {}), store.confirm("w-001", "w-001~toconfirm"),
            store.release("w-002", "w-002~torelease"))
        assert batches == [3], "the three steps went out together"
        assert reserved.ok and confirmed and released.held, (reserved, confirmed, released)
    finally:
        await store.close()


async def test_a_burst_larger_than_one_batch_answers_every_step(redis_url: str) -> None:
    """Steps queue faster than a batch (at most 256) goes out: the first batch takes 256, the next ones the rest,
    and not one step is left without an answer."""
    store, _ = await registered_store(redis_url, 1, max_streams=5)
    try:
        steps = [asyncio.create_task(store.confirm("w-000", f"w-000~nolease{n:04d}")) for n in range(600)]
        done, pending = await asyncio.wait(steps, timeout=60)  # a few round trips; the bound only stops a hang
        for step in pending:
            step.cancel()
        assert not pending, f"{len(pending)} of 600 steps never answered"
        assert not any(step.result() for step in done), "nothing to confirm"
    finally:
        await store.close()
