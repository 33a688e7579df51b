"""Closed-loop HTTP load generator, run as its own process: C concurrent clients for D seconds.

Modes: ``alloc`` (POST /api/v1/sessions then DELETE it; the POST latency is measured), ``create`` (the POST alone:
sessions are left running, so the fleet needs room for all of them), ``health`` (GET /health),
``heartbeat`` (POST heartbeats round-robin over the workers in --secrets), ``heartbeat-ws`` (one WebSocket
heartbeat channel per worker, one message per visit, round-robin over them; as ``fleet worker`` does, only every
``ACK_EVERY``-th heartbeat asks for an answer and waits for it). Unanswered heartbeats are counted from the hub's
own ``fleet_heartbeats_total``, so a message still in flight at the end is not counted as handled; latency is
that of the answered ones. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from pathlib import Path

import aiohttp
import psutil

from worker.heartbeat_channel import ACK_EVERY

#: A request whose latency is not recorded (an unanswered heartbeat).
_UNMEASURED = -1.0

# Users spread over the world, so every region gets traffic.
_CITIES = [(40.7, -74.0), (51.5, -0.1), (35.7, 139.7), (-23.5, -46.6), (19.1, 72.9), (1.35, 103.8),
           (48.9, 2.35), (37.8, -122.4), (-33.9, 151.2), (52.5, 13.4), (43.7, -79.4), (28.6, 77.2)]


def _status(rng: random.Random) -> dict[str, object]:
    return {"active_sessions": [], "cpu_percent": rng.uniform(5, 60), "gpu_utilization": rng.uniform(5, 90),
            "latency_ms": 40.0}


class Load:
    """One request of each mode: returns ('' on success, else the error's name; the latency to record, or None
    for the whole call). ``alloc`` records the creation alone: ending the session is load, not the figure."""

    def __init__(self, http: aiohttp.ClientSession, args: argparse.Namespace, secrets: list[tuple[str, str]]) -> None:
        self.http = http
        self.args = args
        self.secrets = secrets
        self.next_worker = 0
        self.channels: list[list[aiohttp.ClientWebSocketResponse]] = [[] for _ in range(args.concurrency)]
        self.sent = [0] * args.concurrency

    async def open_channels(self) -> None:
        """heartbeat-ws: one channel per worker, as a real fleet holds them, split over the clients."""
        opening = asyncio.Semaphore(64)

        async def open_channel(i: int, wid: str, secret: str) -> None:
            async with opening:
                ws = await self.http.ws_connect(f"/api/v1/workers/{wid}/heartbeat", headers={
                    "Authorization": f"Bearer {self.args.token}", "X-Worker-Secret": secret})
            self.channels[i % self.args.concurrency].append(ws)

        await asyncio.gather(*(open_channel(i, wid, secret)
                               for i, (wid, secret) in enumerate(self.secrets[: self.args.connections or None])))

    async def close(self) -> None:
        for ws in (ws for mine in self.channels for ws in mine):
            await ws.close()

    async def health(self, k: int, rng: random.Random) -> tuple[str, float | None]:
        async with self.http.get("/health") as r:
            await r.read()
            return "" if r.status == 200 else str(r.status), None

    async def heartbeat(self, k: int, rng: random.Random) -> tuple[str, float | None]:
        wid, secret = self.secrets[self.next_worker % len(self.secrets)]
        self.next_worker += 1
        async with self.http.post(f"/api/v1/workers/{wid}/heartbeat", json=_status(rng), headers={
                "Authorization": f"Bearer {self.args.token}", "X-Worker-Secret": secret}) as r:
            await r.read()
            return "" if r.status == 200 else str(r.status), None

    async def heartbeat_ws(self, k: int, rng: random.Random) -> tuple[str, float | None]:
        mine = self.channels[k]
        ws = mine[self.sent[k] % len(mine)]  # round-robin over this client's own channels
        self.sent[k] += 1
        ack = self.sent[k] % ACK_EVERY == 0
        t0 = time.perf_counter()
        await ws.send_json({**_status(rng), "ack": ack})
        if not ack:
            return "", _UNMEASURED
        reply = await ws.receive_json()
        return "" if "worker_id" in reply else str(reply.get("error")), time.perf_counter() - t0

    async def heartbeats_handled(self) -> int:
        """The hub's own count of heartbeats it recorded."""
        async with self.http.get("/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith('fleet_heartbeats_total{result="ok"}'):
                return int(float(line.rsplit(" ", 1)[1]))
        raise RuntimeError("the hub's /metrics has no fleet_heartbeats_total")

    async def alloc(self, k: int, rng: random.Random) -> tuple[str, float | None]:
        """Create a session (the measured part), then end it."""
        lat, lon = rng.choice(_CITIES)
        t0 = time.perf_counter()
        async with self.http.post("/api/v1/sessions", json={"location": {"lat": lat, "lon": lon}}) as r:
            body = await r.read()
        measured = time.perf_counter() - t0
        if r.status != 201:
            return str(r.status), measured
        async with self.http.delete(f"/api/v1/sessions/{json.loads(body)['session_id']}") as r2:
            await r2.read()
        return "" if r2.status == 204 else f"end {r2.status}", measured

    async def create(self, k: int, rng: random.Random) -> tuple[str, float | None]:
        """Create a session and leave it running (as if the worker will report its end)."""
        lat, lon = rng.choice(_CITIES)
        async with self.http.post("/api/v1/sessions", json={"location": {"lat": lat, "lon": lon}}) as r:
            await r.read()
        return "" if r.status == 201 else str(r.status), None


def nearest_rank(ordered: list[float], p: float) -> float:
    """The ``p``-th percentile of ``ordered`` (ascending) by nearest rank: p99 of 100 samples is the 99th, not the
    slowest; NaN when there are none."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


async def run(args: argparse.Namespace) -> dict[str, object]:
    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    done = 0
    secrets: list[tuple[str, str]] = []
    if args.secrets:
        secrets = list(json.loads(Path(args.secrets).read_text()).items())  # noqa: ASYNC240 - before the load
    stop_at = 0.0

    async with aiohttp.ClientSession(base_url=args.url,
                                     connector=aiohttp.TCPConnector(limit=0, force_close=False)) as http:
        load = Load(http, args, secrets)
        request = {"health": load.health, "heartbeat": load.heartbeat, "heartbeat-ws": load.heartbeat_ws,
                   "alloc": load.alloc, "create": load.create}[args.mode]
        if args.mode == "heartbeat-ws":
            await load.open_channels()

        async def client(k: int) -> None:
            nonlocal done
            rng = random.Random(k)
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                measured: float | None = None
                try:
                    error, measured = await request(k, rng)
                except aiohttp.ClientError as exc:
                    error = type(exc).__name__
                if measured != _UNMEASURED:
                    lat_ms.append((time.perf_counter() - t0 if measured is None else measured) * 1000)
                if error:
                    errors[error] = errors.get(error, 0) + 1
                else:
                    done += 1

        # warm-up, then the measured window
        stop_at = time.perf_counter() + args.warmup
        await asyncio.gather(*(client(k) for k in range(args.concurrency)))
        lat_ms.clear()
        errors.clear()
        done = 0
        hub = psutil.Process(args.hub_pid) if args.hub_pid else None
        handled_start = await load.heartbeats_handled() if args.mode == "heartbeat-ws" else 0
        cpu_start = _cpu_s(hub)
        t_start = time.perf_counter()
        stop_at = t_start + args.duration
        await asyncio.gather(*(client(k) for k in range(args.concurrency)))
        elapsed = time.perf_counter() - t_start
        hub_cpu_s = _cpu_s(hub) - cpu_start
        if args.mode == "heartbeat-ws":  # unanswered heartbeats: what the hub says it recorded
            done = await load.heartbeats_handled() - handled_start
        await load.close()
    s = sorted(lat_ms)

    def q(p: float) -> float:
        return round(nearest_rank(s, p), 2)

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
    ap.add_argument("--mode", choices=["alloc", "create", "health", "heartbeat", "heartbeat-ws"], default="alloc")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--secrets")
    ap.add_argument("--connections", type=int, default=0, help="heartbeat-ws: channels to open (0 = every worker)")
    ap.add_argument("--token", default="")
    ap.add_argument("--hub-pid", type=int, default=0, help="account this process's CPU time to the operations")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
