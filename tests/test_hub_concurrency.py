"""Many hub processes, one Redis: a slot is never given twice, and every refusal is a clean 503."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from shared import keys
from tests.conftest import WORKER_AUTH, registration, sync_redis
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
    assert sum(len(w.sessions) for w in workers) == 100
    r = sync_redis(redis_url, decode_responses=True)
    for i in range(20):
        assert r.zcard(keys.worker_keys(f"w-{i:02d}").leases) == len(workers[i].sessions)
