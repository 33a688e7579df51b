"""What the SRE views cost the hub that answers them, at fleet scale.

A dashboard left open refreshes every 3 s (one page of workers, the fleet's capacity, one page of sessions, the
LiveKit map) and Prometheus scrapes ``/metrics``; each is answered on the event loop that also serves the client
requests of that hub, so its cost is time those requests wait. For each fleet size N: register N workers (4 streams
each, 10 regions) through ``FleetStore.register``, start ``fleet hub`` (uvicorn), place N / 4 sessions through the
API from three cities onto the fake worker endpoint (a sixteenth of the slots, on the workers nearest those
cities), then ask each view R times, one at a time, and report the hub's own CPU time per request (psutil: it does
not depend on the client sharing the cores) and the median latency. ``whole listing`` is every page of the worker
listing, as ``fleet workers`` reads it.

    .venv/bin/python -m bench.sre_views            # N = 1000, 10000
    .venv/bin/python -m bench.sre_views --quick    # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import psutil
import redis

from bench.common import (
    ADMIN_TOKEN,
    ROOT,
    Procs,
    record_printout,
    redis_server,
    register_fleet,
    start_fake_workers,
    start_hub,
)
from shared.models import MAX_PAGE

#: The views one dashboard refresh asks for (hub/static/dashboard.js), then the scrape.
DASHBOARD = ["/api/v1/workers?limit=500", "/api/v1/fleet", "/api/v1/sessions?limit=200", "/dashboard/api/livekit"]
VIEWS = [*DASHBOARD, "/metrics"]
REFRESH_S = 3.0


def hub_cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return float(t.user + t.system)


async def place_sessions(base: str, count: int) -> int:
    """``count`` sessions from users in Europe and the Americas, 16 at a time; how many were placed."""
    placed = 0
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        async def one(i: int) -> None:
            nonlocal placed
            lat, lon = ((48.85, 2.35), (40.7, -74.0), (-23.5, -46.6))[i % 3]
            async with sem:
                resp = await client.post("/api/v1/sessions", json={"location": {"lat": lat, "lon": lon}})
            placed += resp.status_code == 201

        await asyncio.gather(*(one(i) for i in range(count)))
    return placed


def measure(client: httpx.Client, hub: psutil.Process, path: str, repeats: int) -> dict[str, Any]:
    """Hub CPU per request and median latency of ``path`` asked ``repeats`` times in a row."""
    client.get(path).raise_for_status()  # warm: the first answer may include a whole board read
    latencies = []
    cpu0 = hub_cpu_s(hub)
    for _ in range(repeats):
        t0 = time.perf_counter()
        resp = client.get(path)
        latencies.append(time.perf_counter() - t0)
        resp.raise_for_status()
    cpu_ms = (hub_cpu_s(hub) - cpu0) / repeats * 1000
    return {"path": path, "hub_cpu_ms": round(cpu_ms, 2), "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "bytes": len(resp.content)}


def whole_listing(client: httpx.Client, hub: psutil.Process) -> dict[str, Any]:
    """Every page of the worker listing, as ``fleet workers`` reads it."""
    cpu0, t0 = hub_cpu_s(hub), time.perf_counter()
    pages, listed, cursor = 0, 0, None
    while True:
        params: dict[str, Any] = {"limit": MAX_PAGE, **({"cursor": cursor} if cursor else {})}
        data = client.get("/api/v1/workers", params=params).raise_for_status().json()
        pages, listed, cursor = pages + 1, listed + len(data["workers"]), data.get("next_cursor")
        if cursor is None:
            break
    return {"pages": pages, "workers": listed, "hub_cpu_ms": round((hub_cpu_s(hub) - cpu0) * 1000, 1),
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    kind = "quick" if args.quick else "full" if (args.sizes, args.repeats) == (None, None) else "custom"
    if kind == "full":
        record_printout(ROOT / "bench" / "results" / "sre_views.txt")
    sizes = [int(x) for x in (args.sizes or ("200" if args.quick else "1000,10000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 30)
    procs = Procs()
    server = redis_server()
    rows: list[dict[str, Any]] = []
    try:
        wport = start_fake_workers(procs)
        for n in sizes:
            redis.Redis.from_url(server.url).flushall()
            asyncio.run(register_fleet(server.url, n, wport))
            proc, base = start_hub(procs, server.url, FLEET_WORKER_TTL_S="600")
            time.sleep(1.5)  # first board refresh
            placed = asyncio.run(place_sessions(base, n // 4))
            hub = psutil.Process(proc.pid)
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as c:
                views = [measure(c, hub, path, repeats) for path in VIEWS]
                listing = whole_listing(c, hub)
            refresh_ms = sum(v["hub_cpu_ms"] for v in views if v["path"] in DASHBOARD)
            rows.append({"workers": n, "sessions": placed, "views": views, "whole_listing": listing,
                         "dashboard_refresh_hub_cpu_ms": round(refresh_ms, 2)})
            print(f"N={n:>6} workers, {placed} sessions:", flush=True)
            for v in views:
                print(f"  {v['path']:<32} {v['hub_cpu_ms']:>7.2f} ms of hub CPU  p50 {v['p50_ms']:>7.2f} ms"
                      f"  {v['bytes'] / 1000:>7.1f} kB", flush=True)
            print(f"  dashboard refresh: {refresh_ms:.1f} ms of hub CPU = {refresh_ms / REFRESH_S / 10:.2f}% of a hub "
                  f"per open dashboard (one refresh per {REFRESH_S:.0f} s)", flush=True)
            print(f"  whole listing: {listing['workers']} workers in {listing['pages']} pages, "
                  f"{listing['hub_cpu_ms']} ms of hub CPU, {listing['seconds']} s", flush=True)
            procs.stop(proc)
    finally:
        procs.close()
        server.stop()
    out = ROOT / "bench" / "results" / ("sre_views.json" if kind == "full" else f"sre_views_{kind}.json")
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
