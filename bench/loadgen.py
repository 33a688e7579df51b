"""Closed-loop HTTP load generator, run as its own process: C concurrent clients for D seconds.

Modes: ``alloc`` (POST /api/v1/sessions then DELETE it; the POST latency is measured), ``health`` (GET /health),
``heartbeat`` (POST heartbeats round-robin over the workers in --secrets). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp
import psutil

# Users spread over the world, so every region gets traffic.
_CITIES = [(40.7, -74.0), (51.5, -0.1), (35.7, 139.7), (-23.5, -46.6), (19.1, 72.9), (1.35, 103.8),
           (48.9, 2.35), (37.8, -122.4), (-33.9, 151.2), (52.5, 13.4), (43.7, -79.4), (28.6, 77.2)]


async def run(args: argparse.Namespace) -> dict[str, object]:
    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    done = 0
    secrets: list[tuple[str, str]] = []
    if args.secrets:
        secrets = list(json.loads(Path(args.secrets).read_text()).items())  # noqa: ASYNC240 - before the load
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    stop_at = 0.0
    hb_next = 0

    async with aiohttp.ClientSession(base_url=args.url, connector=conn) as http:
        async def client(k: int) -> None:
            nonlocal done, hb_next
            rng = random.Random(k)
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    if args.mode == "health":
                        async with http.get("/health") as r:
                            await r.read()
                            ok = r.status == 200
                    elif args.mode == "heartbeat":
                        wid, secret = secrets[hb_next % len(secrets)]
                        hb_next += 1
                        async with http.post(f"/api/v1/workers/{wid}/heartbeat",
                                             json={"active_sessions": [], "cpu_percent": rng.uniform(5, 60),
                                                   "gpu_utilization": rng.uniform(5, 90), "latency_ms": 40.0},
                                             headers={"Authorization": f"Bearer {args.token}",
                                                      "X-Worker-Secret": secret}) as r:
                            await r.read()
                            ok = r.status == 200
                    else:
                        lat, lon = rng.choice(_CITIES)
                        async with http.post("/api/v1/sessions", json={"location": {"lat": lat, "lon": lon}}) as r:
                            body = await r.read()
                            ok = r.status == 201
                        t1 = time.perf_counter()
                        if ok:
                            sid = json.loads(body)["session_id"]
                            async with http.delete(f"/api/v1/sessions/{sid}") as r2:
                                await r2.read()
                        lat_ms.append((t1 - t0) * 1000)
                        if ok:
                            done += 1
                        else:
                            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                        continue
                except aiohttp.ClientError as exc:
                    ok = False
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                lat_ms.append((time.perf_counter() - t0) * 1000)
                if ok:
                    done += 1

        # warm-up, then the measured window
        stop_at = time.perf_counter() + args.warmup
        await asyncio.gather(*(client(k) for k in range(args.concurrency)))
        lat_ms.clear()
        errors.clear()
        done = 0
        hub = psutil.Process(args.hub_pid) if args.hub_pid else None
        cpu_start = _cpu_s(hub)
        t_start = time.perf_counter()
        stop_at = t_start + args.duration
        await asyncio.gather(*(client(k) for k in range(args.concurrency)))
        elapsed = time.perf_counter() - t_start
        hub_cpu_s = _cpu_s(hub) - cpu_start
    s = sorted(lat_ms)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 2) if s else float("nan")

    result: dict[str, object] = {"mode": args.mode, "ok": done, "errors": errors, "elapsed_s": round(elapsed, 2),
                                 "per_s": round(done / elapsed, 1), "p50_ms": q(50), "p99_ms": q(99),
                                 "concurrency": args.concurrency}
    if hub is not None and done:
        # The hub is one single-threaded process: its capacity is 1 / CPU-seconds per operation, whatever share
        # of the two cores the load generator and Redis take from it during the run.
        result.update(hub_cpu_share=round(hub_cpu_s / elapsed, 3),
                      hub_cpu_ms_per_op=round(hub_cpu_s * 1000 / done, 4),
                      hub_capacity_per_s=round(done / hub_cpu_s, 1) if hub_cpu_s else None)
    return result


def _cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    t = process.cpu_times()
    return float(t.user + t.system)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--mode", choices=["alloc", "health", "heartbeat"], default="alloc")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--secrets")
    ap.add_argument("--token", default="")
    ap.add_argument("--hub-pid", type=int, default=0, help="account this process's CPU time to the operations")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
