"""Shared bench plumbing: a real redis-server, a fake-worker endpoint process, a real hub process, fleet set-up.

Everything runs on loopback on this machine; the load generators (``bench.loadgen``) run in their own process so
the client does not share the hub's event loop (it still shares the machine's cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from hub.redis_client import connect
from hub.settings import HubSettings
from hub.store import FleetStore
from shared.auth import new_secret
from shared.geo import AWS_REGIONS
from shared.redis_server import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORKER_TOKEN = "bench-worker-token-0123456789abcdef"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
#: Ten regions the synthetic fleet is spread over (round-robin).
BENCH_REGIONS = ["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-northeast-1", "ap-southeast-1",
                 "ap-south-1", "sa-east-1", "ca-central-1", "ap-southeast-2"]


def hub_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_REDIS_URL=redis_url, FLEET_WORKER_TOKEN=WORKER_TOKEN, FLEET_ADMIN_TOKEN=ADMIN_TOKEN,
               FLEET_RATE_LIMIT_PER_S="0", FLEET_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def wait_http(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Procs:
    """Processes started by a bench, stopped (by pid) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def start_fake_workers(procs: Procs) -> int:
    port = free_port()
    procs.start([PY, "-m", "bench.fakeworkers", "--port", str(port)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_http(f"http://127.0.0.1:{port}/health")
    return port


def start_hub(procs: Procs, redis_url: str, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """``fleet hub`` (uvicorn, one process, as in production)."""
    port = free_port()
    fleet = str(Path(PY).parent / "fleet")
    p = procs.start([fleet, "hub", "--host", "127.0.0.1", "--port", str(port)], env=hub_env(redis_url, **extra))
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health")
    return p, base


def bench_settings(redis_url: str, **overrides: Any) -> HubSettings:
    return HubSettings(redis_url=redis_url, worker_token=WORKER_TOKEN, admin_token=ADMIN_TOKEN,
                       rate_limit_per_s=0, **overrides)


async def register_fleet(redis_url: str, n: int, worker_port: int, *, max_streams: int = 4,
                         settings: HubSettings | None = None, concurrency: int = 64) -> dict[str, str]:
    """Register ``n`` workers through ``FleetStore.register`` (the code path the API uses); id -> secret."""
    settings = settings or bench_settings(redis_url)
    store = FleetStore(connect(settings, redis_url), settings)
    secrets: dict[str, str] = {}
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        wid = f"w{i:05d}"
        region = BENCH_REGIONS[i % len(BENCH_REGIONS)]
        loc = AWS_REGIONS[region]
        url = f"http://127.0.0.1:{worker_port}/w/{wid}"
        static = {"worker_id": wid, "url": url, "region": region, "zone": None, "lat": loc.lat, "lon": loc.lon,
                  "max_streams": max_streams, "gpus": [{"name": "NVIDIA A10G", "vram_total_mb": 24576}],
                  "instance_type": "g5.xlarge", "labels": {}, "engine": None, "registered_at": time.time()}
        secret = new_secret()
        async with sem:
            out = await store.register(wid, None, secret, {"url": url, "region": region,
                                                           "max_streams": str(max_streams)},
                                       json.dumps(static, separators=(",", ":")))
        assert out is not None
        secrets[wid] = secret

    await asyncio.gather(*(one(i) for i in range(n)))
    await store.close()
    return secrets


def run_json(args: list[str], timeout_s: float = 600) -> dict[str, Any]:
    """Run a helper process that prints one JSON object as its last stdout line."""
    out = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def redis_server() -> EmbeddedRedis:
    return EmbeddedRedis().start()


class _Tee:
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def record_printout(path: Path) -> None:
    """From now on, what the bench prints also goes to ``path``: a full run's .txt beside its JSON."""
    sys.stdout = _Tee(sys.stdout, path.open("w", buffering=1))  # type: ignore[assignment]
