"""Soak: a real fleet under churn for N minutes, then a check that Redis counts exactly what the workers run.

Embedded Redis, two `fleet hub` processes and a pool of real `fleet worker` processes (synthetic engine, simulated
T4s, 4 streams each; real agents rather than bench/fakeworkers.py fakes, because the point is the agent's own
heartbeats, drain and re-registration, and a handful of them fit on two cores). While a load generator starts
and ends sessions continuously (a quarter of them with a recurring ``session_key``), a churn loop kills workers
(SIGKILL), drains them (SIGTERM) and brings them back with the same id, and one hub is SIGKILLed and restarted
mid-run. A sampler compares Redis's live leases with the workers' own ``GET /sessions`` throughout.

At the end (no new sessions; the running ones stay up) leases are left to settle, then the check: for every worker,
the sessions Redis holds (live leases, all confirmed) are exactly the ones the worker runs, no worker ever ran more
than max_streams, every refusal was a clean 503 with Retry-After and nothing else failed; then every session is
ended and Redis and the workers must both be empty. Exit code 1 on failure.

    .venv/bin/python -m bench.soak --minutes 3    # bench/results/soak.json
    .venv/bin/python -m bench.soak --quick        # ~30 s, bench/results/soak_quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis.asyncio as aredis

from bench.common import ROOT
from shared import keys
from shared.models import MAX_PAGE
from shared.redis_server import EmbeddedRedis
from tests.conftest import ADMIN_AUTH, WORKER_AUTH
from tests.harness import HubProcess, WorkerProcess

HUB_TIMINGS: dict[str, Any] = dict(heartbeat_interval_s=1.0, worker_ttl_s=3.0, dispatch_timeout_s=3.0,
                                   pending_lease_s=5.0, active_lease_s=6.0, absent_grace_s=1.0,
                                   log_level="ERROR")
REGIONS = ("us-east-1", "us-west-2", "eu-central-1")
CITIES = [(40.7, -74.0), (34.1, -118.2), (51.5, -0.1), (48.9, 2.4), (52.5, 13.4), (47.6, -122.3), (25.8, -80.2)]
STREAMS = 4


@dataclass
class Figures:
    started: int = 0
    reused: int = 0
    ended: int = 0
    already_gone: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    hub_restart_errors: int = 0
    errors: list[str] = field(default_factory=list)
    churn: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    max_drift: int = 0
    max_live_drift: int = 0  # sessions on live workers that one side has and the other not, summed over them
    over_limit: list[str] = field(default_factory=list)
    peak_used: int = 0

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)


def hold_s(rng: random.Random, mean_s: float) -> float:
    """How long a user keeps a session: lognormal, sigma 0.5, averaging ``mean_s`` (mu = -sigma^2 / 2)."""
    return rng.lognormvariate(-0.125, 0.5) * mean_s


class Soak:
    def __init__(self, load_s: float, pool: int, initial: int, mean_hold_s: float, churn_every_s: float,
                 seed: int) -> None:
        self.load_s, self.mean_hold_s, self.churn_every_s = load_s, mean_hold_s, churn_every_s
        self.rng = random.Random(seed)
        self.redis = EmbeddedRedis()
        self.hubs = [HubProcess(self.redis.url, **HUB_TIMINGS) for _ in range(2)]
        urls = [h.url for h in self.hubs]
        self.workers = [WorkerProcess(urls, f"soak-{i:02d}", region=REGIONS[i % len(REGIONS)], max_streams=STREAMS,
                                      drain_timeout_s=2.0, log_level="ERROR") for i in range(pool)]
        self.initial = initial
        self.fig = Figures()
        self.hub_down: set[int] = set()
        self.busy: set[str] = set()  # workers being started or drained by the churn loop
        self.churning: set[asyncio.Task[None]] = set()
        self.keys = [f"conv-{i}" for i in range(40)]
        self.timeline: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    # --- fleet ----------------------------------------------------------------------------------------------

    def up(self) -> None:
        self.redis.start()
        for hub in self.hubs:
            hub.start()
        for w in self.workers[:self.initial]:
            w.spawn()
        for w in self.workers[:self.initial]:
            w.wait_ready()

    def down(self) -> None:
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.stop()
        for hub in self.hubs:
            hub.stop()
        self.redis.cleanup()

    def live_hubs(self) -> list[HubProcess]:
        return [h for i, h in enumerate(self.hubs) if i not in self.hub_down]

    def event(self, what: str) -> None:
        self.timeline.append({"t": round(time.monotonic() - self.t0, 2), "event": what})

    # --- load -----------------------------------------------------------------------------------------------

    async def user(self, http: httpx.AsyncClient) -> None:
        body: dict[str, Any] = {"location": dict(zip(("lat", "lon"), self.rng.choice(CITIES), strict=True))}
        if self.rng.random() < 0.25:
            body["session_key"] = self.rng.choice(self.keys)
        hub_index, resp = await self.call(http, "POST", "/api/v1/sessions", json=body)
        if resp is None:
            return
        if resp.status_code == 503:
            retry_after = resp.headers.get("Retry-After", "")
            if retry_after.isdigit() and int(retry_after) >= 1:
                self.fig.refused[resp.json().get("error", "?")] += 1
            else:
                self.fig.error(f"503 without Retry-After: {resp.text[:200]}")
            return
        if resp.status_code not in (200, 201):
            self.fig.error(f"POST via hub {hub_index}: {resp.status_code} {resp.text[:200]}")
            return
        self.fig.started += resp.status_code == 201
        self.fig.reused += resp.status_code == 200
        await asyncio.sleep(hold_s(self.rng, self.mean_hold_s))
        _, end = await self.call(http, "DELETE", f"/api/v1/sessions/{resp.json()['session_id']}")
        if end is not None and end.status_code == 204:
            self.fig.ended += 1
        elif end is not None and end.status_code == 404:
            self.fig.already_gone += 1  # its worker was killed or drained, or a shared session_key ended it
        elif end is not None:
            self.fig.error(f"DELETE: {end.status_code} {end.text[:200]}")

    async def call(self, http: httpx.AsyncClient, method: str, path: str,
                   **kwargs: Any) -> tuple[int, httpx.Response | None]:
        """Through a hub that is up (a load balancer's view); errors from a hub killed meanwhile are expected."""
        hubs = self.live_hubs()
        hub = self.rng.choice(hubs)
        index = self.hubs.index(hub)
        try:
            return index, await http.request(method, f"{hub.url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            if index in self.hub_down:
                self.fig.hub_restart_errors += 1
            else:
                self.fig.error(f"{method} {path} via hub {index}: {type(exc).__name__} {exc}")
            return index, None

    async def load(self, http: httpx.AsyncClient, rate_per_s: float) -> set[asyncio.Task[None]]:
        users: set[asyncio.Task[None]] = set()
        deadline = self.t0 + self.load_s
        while time.monotonic() < deadline:
            task = asyncio.create_task(self.user(http))
            users.add(task)
            task.add_done_callback(functools.partial(self._finished, users))
            await asyncio.sleep(self.rng.expovariate(rate_per_s))
        return users

    def _finished(self, running: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        """A user or churn task that crashed is an error of the run, not a task nobody reads."""
        running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fig.error(f"{task.get_coro().__qualname__} crashed: {type(exc).__name__} {exc}")

    # --- churn ----------------------------------------------------------------------------------------------

    async def churn(self) -> None:
        actions = itertools.cycle(["kill", "join", "drain", "join"])
        hub_restarted = False
        while time.monotonic() - self.t0 < self.load_s - self.churn_every_s:
            await asyncio.sleep(self.churn_every_s)
            action = next(actions)
            if not hub_restarted and time.monotonic() - self.t0 > self.load_s / 2:
                hub_restarted = True  # once, mid-run, on top of this round's worker churn
                self.spawn(self.restart_hub(1))
            running = [w for w in self.workers if w.running and w.worker_id not in self.busy]
            stopped = [w for w in self.workers if not w.running and w.worker_id not in self.busy]
            if action == "join" or len(running) <= 2:
                if stopped:
                    self.spawn(self.join(self.rng.choice(stopped)))
            elif action == "kill":
                victim = self.rng.choice(running)
                victim.kill()
                self.fig.churn["kill"] += 1
                self.event(f"SIGKILL {victim.worker_id}")
            else:
                self.spawn(self.drain(self.rng.choice(running)))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.churning.add(task)
        task.add_done_callback(functools.partial(self._finished, self.churning))

    async def join(self, w: WorkerProcess) -> None:
        self.busy.add(w.worker_id)
        try:
            await asyncio.to_thread(w.start)  # a just-killed id registers once its old TTL lapses
            self.fig.churn["join"] += 1
            self.event(f"joined {w.worker_id}")
        except RuntimeError as exc:
            self.fig.error(f"join {w.worker_id}: {exc}")
        finally:
            self.busy.discard(w.worker_id)

    async def drain(self, w: WorkerProcess) -> None:
        self.busy.add(w.worker_id)
        try:
            self.event(f"SIGTERM {w.worker_id}")
            code = await asyncio.to_thread(w.stop, 15.0)
            self.fig.churn["drain"] += 1
            if code != 0:
                self.fig.error(f"drained {w.worker_id} exited {code}")
        finally:
            self.busy.discard(w.worker_id)

    async def restart_hub(self, index: int) -> None:
        """SIGKILL a hub (its in-flight requests die with it) and start it again on the same port."""
        self.hub_down.add(index)
        await asyncio.sleep(0.2)  # let the load balancer's view change before the hub dies
        self.hubs[index].kill()
        self.event(f"SIGKILL hub {index}")
        await asyncio.sleep(2.0)
        await asyncio.to_thread(self.hubs[index].start)
        self.hub_down.discard(index)
        self.fig.churn["hub_restart"] += 1
        self.event(f"hub {index} back")

    # --- measuring ------------------------------------------------------------------------------------------

    async def measure(self, http: httpx.AsyncClient, store: aredis.Redis) -> dict[str, Any] | None:
        """Redis's live leases and confirmed ones, and each running worker's own sessions; None if a worker died
        mid-read (the next sample will do)."""
        own: dict[str, set[str]] = {}
        for w in self.workers:
            if not w.running:
                own[w.worker_id] = set()
                continue
            try:
                resp = await http.get(f"{w.url}/sessions", headers=WORKER_AUTH, timeout=3)
                own[w.worker_id] = {s["session_id"] for s in resp.json()}
            except (httpx.HTTPError, ValueError):
                return None
        seconds, micros = await store.time()
        now_ms = seconds * 1000 + micros // 1000
        held: dict[str, set[str]] = {}
        confirmed: dict[str, int] = {}
        for w in self.workers:
            k = keys.worker_keys(w.worker_id)
            # Live leases only, as the hub counts them: a dead worker's expired ones linger until a script purges.
            held[w.worker_id] = {str(sid) for sid in await store.zrangebyscore(k.leases, f"({now_ms}", "+inf")}
            active = {str(sid) for sid in await store.hkeys(k.active)}
            confirmed[w.worker_id] = len(held[w.worker_id] & active)
        return {"own": own, "held": held, "confirmed": confirmed}

    def record(self, m: dict[str, Any]) -> None:
        own, held = m["own"], m["held"]
        used, real = sum(len(s) for s in held.values()), sum(len(s) for s in own.values())
        live = [w.worker_id for w in self.workers if w.running]
        live_drift = sum(len(held[wid] ^ own[wid]) for wid in live)
        self.fig.samples += 1
        self.fig.max_drift = max(self.fig.max_drift, abs(used - real))
        self.fig.max_live_drift = max(self.fig.max_live_drift, live_drift)
        self.fig.peak_used = max(self.fig.peak_used, real)
        for wid, s in own.items():
            if len(s) > STREAMS:
                self.fig.over_limit.append(f"{wid} ran {len(s)} > {STREAMS}")

    async def sampler(self, http: httpx.AsyncClient, store: aredis.Redis, stop: asyncio.Event) -> None:
        while not stop.is_set():
            m = await self.measure(http, store)
            if m is not None:
                self.record(m)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def settle(self, http: httpx.AsyncClient, store: aredis.Redis, timeout_s: float) -> dict[str, Any]:
        """Until Redis holds exactly what each worker runs, all confirmed (or the timeout: the last reading)."""
        started = time.monotonic()
        m: dict[str, Any] | None = None
        while True:
            m = await self.measure(http, store) or m
            if m is not None:
                self.record(m)
                exact = all(m["held"][w] == m["own"][w] and m["confirmed"][w] == len(m["own"][w]) for w in m["own"])
                if exact or time.monotonic() - started > timeout_s:
                    m["settle_s"] = round(time.monotonic() - started, 2)
                    m["exact"] = exact
                    return m
            await asyncio.sleep(0.5)

    # --- the run --------------------------------------------------------------------------------------------

    async def run(self, rate_per_s: float) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=20)
        store = aredis.Redis.from_url(self.redis.url, decode_responses=True)
        stop_sampling = asyncio.Event()
        async with httpx.AsyncClient(timeout=15, limits=limits) as http:
            sampler = asyncio.create_task(self.sampler(http, store, stop_sampling))
            churn = asyncio.create_task(self.churn())
            users = await self.load(http, rate_per_s)
            await churn
            await asyncio.gather(*self.churning)
            self.event("load stopped")
            for task in list(users):
                task.cancel()  # the users' sessions keep running: the final check is about live sessions
            await asyncio.gather(*users, return_exceptions=True)
            stop_sampling.set()
            await sampler
            settle_timeout = HUB_TIMINGS["active_lease_s"] + HUB_TIMINGS["worker_ttl_s"] + 10
            final = await self.settle(http, store, settle_timeout)
            ended = await self.end_everything(http)
            empty = await self.settle(http, store, settle_timeout)
            ready = [(await http.get(f"{h.url}/ready")).status_code for h in self.hubs]
        await store.aclose()
        return self.report(final, empty, ended, ready, rate_per_s)

    async def end_everything(self, http: httpx.AsyncClient) -> int:
        # One page: the soak's fleet holds far fewer sessions than a page.
        held = (await http.get(f"{self.hubs[0].url}/api/v1/sessions", params={"limit": MAX_PAGE},
                               headers=ADMIN_AUTH)).json()["sessions"]
        answers = await asyncio.gather(*(http.delete(f"{self.hubs[n % 2].url}/api/v1/sessions/{s['session_id']}")
                                         for n, s in enumerate(held)))
        return sum(a.status_code == 204 for a in answers)

    def report(self, final: dict[str, Any], empty: dict[str, Any], ended_at_end: int, ready: list[int],
               rate_per_s: float) -> dict[str, Any]:
        used = sum(len(s) for s in final["held"].values())
        real = sum(len(s) for s in final["own"].values())
        empty_used = sum(len(s) for s in empty["held"].values())
        empty_real = sum(len(s) for s in empty["own"].values())
        checks = {
            "redis_equals_workers": final["exact"] and used == real,
            "empty_after_ending_all": empty["exact"] and empty_used == empty_real == 0,
            "never_above_max_streams": not self.fig.over_limit,
            "no_unexpected_errors": not self.fig.errors,
            "hubs_ready": ready == [200] * len(ready),
            "churn_happened": self.fig.churn["kill"] > 0 and self.fig.churn["drain"] > 0
            and self.fig.churn["hub_restart"] == 1,
        }
        fig = asdict(self.fig)
        fig["refused"] = dict(self.fig.refused)
        fig["churn"] = dict(self.fig.churn)
        return {
            "config": {"load_s": self.load_s, "pool": len(self.workers), "initial_workers": self.initial,
                       "max_streams": STREAMS, "rate_per_s": rate_per_s, "mean_hold_s": self.mean_hold_s,
                       "churn_every_s": self.churn_every_s, "hub": HUB_TIMINGS, "workers": "real `fleet worker`"},
            "figures": fig,
            "final": {"redis_used": used, "workers_real": real, "settle_s": final["settle_s"],
                      "per_worker": {w: {"redis": len(final["held"][w]), "confirmed": final["confirmed"][w],
                                         "worker": len(final["own"][w]),
                                         "mismatch": sorted(final["held"][w] ^ final["own"][w])}
                                     for w in final["own"]},
                      "ended_at_end": ended_at_end, "after_end_redis_used": empty_used,
                      "after_end_workers_real": empty_real},
            "checks": checks,
            "passed": all(checks.values()),
            "timeline": self.timeline,
        }


def _print(res: dict[str, Any]) -> None:
    f, fin = res["figures"], res["final"]
    refused = sum(f["refused"].values())
    print(f"soak {res['config']['load_s']:.0f}s of load, {res['config']['pool']} worker slots x {STREAMS} streams, "
          f"{res['config']['rate_per_s']:.2f} users/s, mean hold {res['config']['mean_hold_s']}s")
    print(f"  sessions started {f['started']}, reused by session_key {f['reused']}, ended {f['ended']}, "
          f"already gone {f['already_gone']}, peak running {f['peak_used']}")
    print(f"  503s {refused} {f['refused']}, errors during the hub restart {f['hub_restart_errors']}, "
          f"unexpected errors {len(f['errors'])}")
    print(f"  churn {f['churn']}")
    print(f"  drift over {f['samples']} samples: max |redis used - workers' sessions| {f['max_drift']}, "
          f"max sessions mismatched on live workers (all of them) {f['max_live_drift']}, "
          f"over max_streams {len(f['over_limit'])}")
    print(f"  final: redis used {fin['redis_used']} == workers' own {fin['workers_real']} (settled in "
          f"{fin['settle_s']}s); after ending all {fin['ended_at_end']}: redis {fin['after_end_redis_used']}, "
          f"workers {fin['after_end_workers_real']}")
    for err in f["errors"][:10]:
        print(f"  error: {err}")
    failed = [name for name, ok in res["checks"].items() if not ok]
    print(f"final check: {'PASS' if res['passed'] else 'FAIL ' + ', '.join(failed)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="Minutes of load and churn.")
    ap.add_argument("--quick", action="store_true", help="About 30 s in all (smoke test).")
    ap.add_argument("--workers", type=int, default=6, help="Pool of worker ids; one in six starts stopped.")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    load_s = 13.0 if args.quick else args.minutes * 60
    pool = max(3, args.workers)
    initial = pool - max(1, pool // 6)
    mean_hold_s = 3.0 if args.quick else 10.0
    # Offered load about 1.2x the capacity of the initial workers, so 503s happen too.
    rate = 1.2 * initial * STREAMS / mean_hold_s
    soak = Soak(load_s, pool, initial, mean_hold_s, churn_every_s=2.5 if args.quick else 10.0, seed=args.seed)
    try:
        soak.up()
        soak.t0 = time.monotonic()
        res = asyncio.run(soak.run(rate))
    finally:
        soak.down()
    out = ROOT / "bench" / "results" / ("soak_quick.json" if args.quick else "soak.json")
    out.write_text(json.dumps(res, indent=2, default=sorted))
    _print(res)
    raise SystemExit(0 if res["passed"] else 1)


if __name__ == "__main__":
    main()
