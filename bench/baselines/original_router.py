"""The ORIGINAL design (seed ``smart_router.py``), reproduced as a baseline.

For every request: SMEMBERS ``active_workers``, GET every ``worker:{id}`` JSON (one awaited round trip each, as
``WorkerDiscoveryService.get_healthy_workers`` does), score every worker in Python with the seed's weights —
distance 0.4, (1 - load) 0.3, (1 - perf) 0.2, capacity 0.1 — sort, take the best with free streams and reserve
it. ``reserve_worker_capacity`` is not shown in the seed; here it is one atomic Lua check-and-increment on the
worker's JSON (cheaper than anything the seed could do, so the baseline is favoured). ``--pipelined`` is a
generous variant that fetches all workers with one MGET instead of N GETs.

Runs in-process (no HTTP), C concurrent tasks for D seconds; prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import redis.asyncio as aioredis

from shared.geo import AWS_REGIONS, haversine_km

PREFIX = "orig:"
#: Either kind of client: the slot scripts touch one key each (the tests run them on a Redis Cluster too).
Client = aioredis.Redis | aioredis.RedisCluster
# KEYS[1] the worker's JSON. Returns 1 when a stream was taken, 0 when the worker is unknown or full.
_RESERVE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local w = cjson.decode(raw)
if w['available_streams'] <= 0 then return 0 end
w['available_streams'] = w['available_streams'] - 1
w['current_load'] = w['current_load'] + 1
redis.call('SET', KEYS[1], cjson.encode(w))
return 1
"""
# KEYS[1] the worker's JSON. Returns 1 when a stream was given back, 0 when the worker is unknown or has none taken.
_RELEASE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local w = cjson.decode(raw)
if w['available_streams'] >= w['max_streams'] then return 0 end
w['available_streams'] = w['available_streams'] + 1
w['current_load'] = w['current_load'] - 1
redis.call('SET', KEYS[1], cjson.encode(w))
return 1
"""
_CITIES = [(40.7, -74.0), (51.5, -0.1), (35.7, 139.7), (-23.5, -46.6), (19.1, 72.9), (1.35, 103.8),
           (48.9, 2.35), (37.8, -122.4), (-33.9, 151.2), (52.5, 13.4), (43.7, -79.4), (28.6, 77.2)]


def calculate_distance_score(user: dict[str, float], loc: dict[str, float]) -> float:
    """Higher is nearer: 1 at the user, 0 at the antipode (the seed's helper is not shown; geodesic in km)."""
    return 1.0 - min(haversine_km(user["lat"], user["lon"], loc["lat"], loc["lon"]) / 20015.0, 1.0)


def score_worker(user: dict[str, float], w: dict[str, Any]) -> float:
    distance_score = calculate_distance_score(user, w["location"])
    load_score = w["current_load"] / w["max_capacity"]
    performance_score = w["avg_response_time_ms"] / 1000
    capacity_score = w["available_streams"] / w["max_streams"]
    return float(distance_score * 0.4 + (1 - load_score) * 0.3 + (1 - performance_score) * 0.2 + capacity_score * 0.1)


async def populate(r: Client, n: int, regions: list[str], max_streams: int = 4) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        region = regions[i % len(regions)]
        loc = AWS_REGIONS[region]
        wid = f"w{i:05d}"
        pipe.set(f"{PREFIX}worker:{wid}", json.dumps({
            "worker_id": wid, "region": region, "location": {"lat": loc.lat, "lon": loc.lon},
            "internal_url": f"http://127.0.0.1/w/{wid}", "current_load": 0, "max_capacity": max_streams,
            "max_streams": max_streams, "available_streams": max_streams, "avg_response_time_ms": 40.0,
            "last_heartbeat": time.time(), "status": "healthy"}))
        pipe.sadd(f"{PREFIX}active_workers", wid)
    await pipe.execute()


async def get_healthy_workers(r: Client, pipelined: bool) -> list[dict[str, Any]]:
    ids = [str(wid) for wid in await r.smembers(f"{PREFIX}active_workers")]  # decoded already; str() for mypy
    if pipelined:
        raws = await r.mget([f"{PREFIX}worker:{wid}" for wid in ids])
    else:
        raws = [await r.get(f"{PREFIX}worker:{wid}") for wid in ids]
    now = time.time()
    return [w for raw in raws if raw and now - (w := json.loads(raw))["last_heartbeat"] < 300]


class Slots:
    """The baseline's slot scripts on one client: take a stream when a session starts, give it back when it ends."""

    def __init__(self, r: Client) -> None:
        self._reserve = r.register_script(_RESERVE)
        self._release = r.register_script(_RELEASE)

    async def take(self, worker_id: str) -> bool:
        return bool(await self._reserve(keys=[f"{PREFIX}worker:{worker_id}"]))

    async def give(self, worker_id: str) -> bool:
        """Capacity is checked only when taking: a full worker must get its slot back."""
        return bool(await self._release(keys=[f"{PREFIX}worker:{worker_id}"]))


async def route(r: Client, slots: Slots, user: dict[str, float], pipelined: bool) -> str | None:
    for _ in range(5):  # the seed recurses on a lost race
        workers = await get_healthy_workers(r, pipelined)
        scored = sorted(((score_worker(user, w), w) for w in workers), key=lambda x: x[0], reverse=True)
        best = next((w for _, w in scored if w["available_streams"] > 0), None)
        if best is None:
            return None
        if await slots.take(best["worker_id"]):
            return str(best["worker_id"])
    return None


async def run(args: argparse.Namespace) -> dict[str, object]:
    r = aioredis.Redis.from_url(args.redis, decode_responses=True, max_connections=args.concurrency + 4)
    regions = args.regions.split(",")
    await r.delete(f"{PREFIX}active_workers")
    await populate(r, args.workers, regions)
    slots = Slots(r)
    lat: list[float] = []
    done = 0
    stop_at = time.perf_counter() + args.duration

    async def client(k: int) -> None:
        nonlocal done
        rng = random.Random(k)
        while time.perf_counter() < stop_at:
            la, lo = rng.choice(_CITIES)
            t0 = time.perf_counter()
            wid = await route(r, slots, {"lat": la, "lon": lo}, args.pipelined)
            lat.append((time.perf_counter() - t0) * 1000)
            if wid:
                done += 1
                await slots.give(wid)  # the session ends

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    await r.aclose()
    s = sorted(lat)
    return {"mode": "baseline-pipelined" if args.pipelined else "baseline", "workers": args.workers, "ok": done,
            "elapsed_s": round(elapsed, 2), "per_s": round(done / elapsed, 2),
            "p50_ms": round(s[len(s) // 2], 1) if s else None,
            "p99_ms": round(s[int(0.99 * (len(s) - 1))], 1) if s else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", required=True)
    ap.add_argument("--workers", type=int, default=10000)
    ap.add_argument("--regions", default="us-east-1,us-west-2,eu-west-1,eu-central-1,ap-northeast-1")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--pipelined", action="store_true")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
