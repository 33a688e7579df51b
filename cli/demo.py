"""`fleet demo`: a whole local fleet in one command — embedded Redis, two hubs, simulated GPU workers in three
regions and a trickle of synthetic users from around the world. Ctrl-C, SIGTERM or closing the terminal stops
everything cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from shared.children import ended_with_this_process
from shared.geo import AWS_REGIONS, region_location
from shared.models import MAX_PAGE
from shared.redis_server import EmbeddedRedis

#: (city, lat, lon, relative weight ~ metro population in millions)
CITIES = [
    ("New York", 40.71, -74.01, 19), ("Los Angeles", 34.05, -118.24, 13), ("Chicago", 41.88, -87.63, 9),
    ("Toronto", 43.65, -79.38, 6), ("Mexico City", 19.43, -99.13, 21), ("São Paulo", -23.55, -46.63, 22),
    ("London", 51.51, -0.13, 14), ("Paris", 48.86, 2.35, 11), ("Berlin", 52.52, 13.4, 6),
    ("Madrid", 40.42, -3.7, 7), ("Stockholm", 59.33, 18.07, 2), ("Lagos", 6.52, 3.38, 15),
    ("Mumbai", 19.08, 72.88, 21), ("Singapore", 1.35, 103.82, 6), ("Tokyo", 35.68, 139.69, 37),
    ("Sydney", -33.87, 151.21, 5), ("Seattle", 47.61, -122.33, 4), ("Miami", 25.76, -80.19, 6),
]
#: LiveKit deployments for the demo (all pointing at a local dev server, with its dev key), so the hub's choice of
#: region is visible; the hub refuses these dev secrets in prod.
DEMO_LIVEKIT = json.dumps([
    {"region": name, "url": "ws://localhost:7880", "lat": lat, "lon": lon, "api_key": "devkey", "api_secret": "secret"}
    for name, lat, lon in (("lk-virginia", 38.95, -77.45), ("lk-oregon", 45.84, -119.7), ("lk-frankfurt", 50.11, 8.68),
                           ("lk-tokyo", 35.68, 139.69))
])
GPUS = ["t4", "a10g", "l4"]
HUBS = 2
#: Session lengths are lognormal around --mean-session-s with this sigma: their mean is e^(σ²/2) ≈ 1.13 times it.
SESSION_LENGTH_SIGMA = 0.5
#: Without --users-per-min, users arrive at the rate that keeps this share of the fleet's stream slots busy: enough
#: to watch placement spread the load, with room left for a session made by hand.
BUSY_SHARE = 0.7
#: Users per minute when the fleet's stream slots cannot be read.
FALLBACK_USERS_PER_MIN = 60.0
#: Ctrl-C, SIGTERM, and SIGHUP when the terminal closes: the children run in their own sessions and hear none of
#: them, so the demo stops them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class Part:
    """A hub or worker process of the fleet."""

    name: str  # "the hub on port 8080", "worker demo-us-east-1-0 on port 9100"
    proc: subprocess.Popen[bytes]
    log_path: str

    def check_running(self) -> None:
        if self.proc.poll() is not None:  # e.g. its port was taken after the check: say so now, not at a timeout
            raise DemoFailed(f"{self.name} exited with code {self.proc.returncode} while starting: "
                             f"{_tail(self.log_path)}")


@dataclass
class Fleet:
    redis: EmbeddedRedis | None = None
    hubs: list[Part] = field(default_factory=list)
    workers: list[Part] = field(default_factory=list)


def _spawn(name: str, args: list[str], env: dict[str, str], log_path: str) -> Part:
    # Its own session: a Ctrl-C in the terminal reaches the demo, which stops the fleet in order; and a SIGTERM
    # from Linux if the demo is killed before it could. The child keeps its own copy of the log's descriptor.
    with open(log_path, "ab") as log:
        return Part(name, subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, stdout=log,
                                           stderr=log, start_new_session=True,
                                           preexec_fn=ended_with_this_process()), log_path)


class DemoFailed(Exception):
    """A part of the fleet did not start; the message says which and why."""


class DemoMisused(DemoFailed):
    """Options the demo cannot run with (bad usage: exit 2, as for any other command)."""


def _check_ports(hub_ports: range, worker_ports: range) -> None:
    """Before starting anything: a port already taken would leave this run talking to whatever holds it, another
    demo's hub most often, and reporting that fleet as its own."""
    for option, who, ports in (("--hub-port", "hubs", hub_ports), ("--worker-port", "workers", worker_ports)):
        if ports[0] < 1 or ports[-1] > 65535:
            raise DemoMisused(f"{option} {ports[0]}: the {who} need ports {_span(ports)}, outside 1-65535")
    if set(hub_ports) & set(worker_ports):
        raise DemoMisused(f"the hubs' ports {_span(hub_ports)} and the workers' {_span(worker_ports)} overlap")
    for port in (*hub_ports, *worker_ports):
        if not _port_is_free(port):
            raise DemoFailed(f"port {port} is in use: is another fleet demo running? "
                             "(--hub-port and --worker-port choose others)")


def _span(ports: range) -> str:
    return f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0])


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the hubs and workers bind: TIME_WAIT is free
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _listed_workers(hub_url: str, admin_token: str) -> dict[str, int] | None:
    """The workers the hub lists, each with the stream slots it registered (0 if not said); None unless the hub is
    ready and takes this run's admin token, which no other fleet's hub (nor anything else that took its port) does."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
        # One page: a demo fleet on one machine is far smaller than a page.
        resp = httpx.get(f"{hub_url}/api/v1/workers", params={"limit": MAX_PAGE},
                         headers={"Authorization": f"Bearer {admin_token}"}, timeout=2)
        if resp.status_code == 200:
            return {worker["worker_id"]: int(worker.get("max_streams", 0)) for worker in resp.json()["workers"]}
    return None


def _wait_for_hub(hub_url: str, hub: Part, admin_token: str, step: Callable[[], None],
                  timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        step()
        hub.check_running()
        if _listed_workers(hub_url, admin_token) is not None:
            return
        time.sleep(0.1)
    raise DemoFailed(f"{hub.name} did not become ready within {timeout_s:.0f}s: {_tail(hub.log_path)}")


def _wait_for_workers(hub_url: str, workers: dict[str, Part], admin_token: str, step: Callable[[], None],
                      timeout_s: float = 60.0) -> int:
    """Until the hub lists every worker, so the banner never counts one that did not start; then the stream slots
    of every worker it lists (as each registered them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        step()
        for worker in workers.values():
            worker.check_running()
        listed = _listed_workers(hub_url, admin_token) or {}
        missing = sorted(set(workers) - set(listed))
        if not missing:
            return sum(listed.values())
        if time.monotonic() > deadline:
            late = workers[missing[0]]
            raise DemoFailed(f"{late.name} did not register within {timeout_s:.0f}s"
                             f"{f' (nor did {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                             f"{_tail(late.log_path)}")
        time.sleep(0.2)


def _tail(log_path: str, lines: int = 3) -> str:
    with contextlib.suppress(OSError), open(log_path, errors="replace") as log:
        return " | ".join(line.strip() for line in log.readlines()[-lines:]) or "(empty log)"
    return "(no log)"


def _mean_session_length(mean_session_s: float) -> float:
    return mean_session_s * math.exp(SESSION_LENGTH_SIGMA ** 2 / 2)


def users_per_min_for(stream_slots: int, mean_session_s: float) -> float:
    """The arrival rate that keeps ``BUSY_SHARE`` of ``stream_slots`` busy: sessions in flight are the arrival
    rate times the mean session length (Little's law). A fixed rate overloaded small hosts (2 cores: 4 streams a
    worker, 36 in all, for ~45 users at once), and a fifth of the requests were refused."""
    if stream_slots <= 0:
        return FALLBACK_USERS_PER_MIN
    return max(0.1, 60 * BUSY_SHARE * stream_slots / _mean_session_length(mean_session_s))


def _load_line(users_per_min: float, mean_session_s: float, stream_slots: int) -> str:
    """What the synthetic users ask of the fleet, so refusals (``!`` lines) can be told from a fault."""
    line = f"{users_per_min:.3g} a minute, sessions ~{mean_session_s:g} s"
    if stream_slots > 0:
        busy = users_per_min / 60 * _mean_session_length(mean_session_s) / stream_slots
        line += f": they ask for ~{busy:.0%} of the fleet's {stream_slots} streams"
    return line


def run_demo(workers: int, regions: list[str], hub_port: int, worker_port: int, users_per_min: float | None,
             mean_session_s: float, duration_s: float | None, log_dir: str) -> int:
    """Run the fleet until Ctrl-C, SIGTERM, SIGHUP or ``duration_s``; returns the exit code (130 when interrupted
    while starting). ``users_per_min`` None: as many as keep ``BUSY_SHARE`` of the fleet's streams busy. Whatever
    happens, nothing it started is left running."""
    _check_regions(regions)
    hub_ports, worker_ports = range(hub_port, hub_port + HUBS), range(worker_port, worker_port + workers)
    _check_ports(hub_ports, worker_ports)
    os.makedirs(log_dir, exist_ok=True)
    admin_token, worker_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    fleet = Fleet()
    stop = asyncio.Event()
    # While starting, the stop signals are noted and acted on between steps. Raising from the handler could land
    # inside subprocess.Popen (a child started but never recorded, so never stopped) or inside an exec() of an
    # import (after which CPython exits by SIGINT whatever the exit code).
    interrupted = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: interrupted.set())

    def step() -> None:
        if interrupted.is_set():
            raise _Interrupted

    try:
        fleet.redis = EmbeddedRedis().start()
        step()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        env = {**base_env, "FLEET_REDIS_URL": fleet.redis.url, "FLEET_ADMIN_TOKEN": admin_token,
               "FLEET_WORKER_TOKEN": worker_token, "FLEET_RATE_LIMIT_PER_S": "0", "FLEET_LOG_LEVEL": "WARNING",
               "FLEET_LIVEKIT_REGIONS": DEMO_LIVEKIT}
        hub_urls = [f"http://127.0.0.1:{port}" for port in hub_ports]
        for i, port in enumerate(hub_ports):
            fleet.hubs.append(_spawn(f"the hub on port {port}", ["hub", "--port", str(port)], env,
                                     f"{log_dir}/hub-{i}.log"))
            step()
        for url, hub in zip(hub_urls, fleet.hubs, strict=True):
            _wait_for_hub(url, hub, admin_token, step)
        by_id: dict[str, Part] = {}
        for i, port in enumerate(worker_ports):
            region, gpu = regions[i % len(regions)], GPUS[(i // len(regions)) % len(GPUS)]
            worker_id = f"demo-{region}-{i}"
            worker_env = {**env, "FLEET_HUB_URLS": ",".join(hub_urls), "FLEET_WORKER_ID": worker_id,
                          "FLEET_DRAIN_TIMEOUT_S": "10"}  # demo sessions are synthetic: drain quickly on Ctrl-C
            by_id[worker_id] = _spawn(
                f"worker {worker_id} on port {port}",
                ["worker", "--host", "127.0.0.1", "--port", str(port), "--region", region, "--simulate-gpu", gpu,
                 "--engine", "synthetic"], worker_env, f"{log_dir}/worker-{i}.log")
            fleet.workers.append(by_id[worker_id])
            step()
        stream_slots = _wait_for_workers(hub_urls[0], by_id, admin_token, step)
        if users_per_min is None:
            users_per_min = users_per_min_for(stream_slots, mean_session_s)
        fleet_command = _fleet_command()
        # Dev tokens of a throwaway local fleet, printed so that each command can be pasted as it is (its
        # comment included).
        _say(f"\ngpu-fleet demo: {workers} workers in {', '.join(regions)}, hubs {', '.join(hub_urls)}\n"
             f"  dashboard:   {hub_urls[0]}/dashboard   (admin token: {admin_token})\n"
             f"  SRE CLI:     FLEET_HUB_URL={hub_urls[0]} FLEET_ADMIN_TOKEN={admin_token} {fleet_command} workers\n"
             f"  a session:   curl -s -X POST {hub_urls[1]}/api/v1/sessions -H 'Content-Type: application/json' "
             "-d '{\"location\": {\"lat\": 48.85, \"lon\": 2.35}}'\n"
             f"  end it:      curl -s -X DELETE {hub_urls[1]}/api/v1/sessions/SESSION_ID   # the demo ends only "
             "its own users' sessions\n"
             f"  a worker:    FLEET_HUB_URLS={','.join(hub_urls)} FLEET_WORKER_TOKEN={worker_token} {fleet_command} "
             f"worker --host 127.0.0.1 --port 0 --region {regions[0]} --simulate-gpu t4   # yours to stop\n"
             f"  users:       {_load_line(users_per_min, mean_session_s, stream_slots)}; "
             "+ placed, ! refused or failed\n"
             f"  logs:        {log_dir}/   — Ctrl-C stops everything\n")
        return asyncio.run(_users(hub_urls, users_per_min, mean_session_s, duration_s, stop, interrupted))
    except _Interrupted:
        return 130
    finally:
        _shutdown(fleet)


def _fleet_command() -> str:
    """``fleet`` as the user's shell can run it: `make run` leaves the venv's bin directory off PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "fleet")
    if not os.access(beside, os.X_OK):
        return f"{shlex.quote(sys.executable)} -m cli.main"
    on_path = shutil.which("fleet")
    return "fleet" if on_path and os.path.samefile(on_path, beside) else shlex.quote(beside)


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # the terminal is gone (SIGHUP): stopping the fleet matters more
        print(text, flush=True)


def _check_regions(regions: list[str]) -> None:
    if not regions:
        raise DemoMisused("--regions names no region")
    unknown = [r for r in regions if region_location(r) is None]
    if unknown:
        raise DemoMisused(f"unknown region {', '.join(unknown)}; known: {', '.join(sorted(AWS_REGIONS))}")


class _Interrupted(Exception):
    """A stop signal while the fleet was starting."""


def _refusal(resp: httpx.Response) -> str:
    """The hub's reason for an answer other than the one hoped for: its error code, else the status."""
    with contextlib.suppress(ValueError, AttributeError):
        code = resp.json().get("error")
        if isinstance(code, str):
            return f"{code} ({resp.status_code})"
    return f"HTTP {resp.status_code}"


async def _users(hub_urls: list[str], users_per_min: float, mean_session_s: float, duration_s: float | None,
                 stop: asyncio.Event, interrupted: threading.Event) -> int:
    """Synthetic users until a stop signal or ``duration_s``; the exit code. A stop signal is how a demo normally
    ends, so it exits 0 whatever the counts say (a user that hit a Redis outage made `make run` report an error
    after Ctrl-C); a run with ``duration_s`` is a check, and fails on any error."""
    loop = asyncio.get_running_loop()

    def stop_by_signal() -> None:
        interrupted.set()
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop_by_signal)
    if interrupted.is_set():  # a signal that came after the last start-up step, before these handlers
        stop.set()
    rng = random.Random()
    names, weights = [c[0:3] for c in CITIES], [c[3] for c in CITIES]
    hubs = itertools.cycle(hub_urls)
    stats = {"created": 0, "no_capacity": 0, "errors": 0, "ended": 0}
    tasks: set[asyncio.Task[None]] = set()

    async def user(http: httpx.AsyncClient) -> None:
        city, lat, lon = rng.choices(names, weights)[0]
        try:
            resp = await http.post(f"{next(hubs)}/api/v1/sessions",
                                   json={"location": {"lat": lat, "lon": lon}, "identity": f"user-{city[:3]}"})
        except httpx.HTTPError as exc:
            stats["errors"] += 1
            _say(f"  ! {city:<12} no answer: {type(exc).__name__}")
            return
        if resp.status_code != 201:
            stats["no_capacity" if resp.status_code == 503 else "errors"] += 1
            _say(f"  ! {city:<12} refused: {_refusal(resp)}")
            return
        stats["created"] += 1
        body = resp.json()
        _say(f"  + {city:<12} → {body['worker']['id']:<24} livekit {body['livekit']['region']}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.lognormvariate(0, SESSION_LENGTH_SIGMA) * mean_session_s)
        try:
            resp = await http.delete(f"{next(hubs)}/api/v1/sessions/{body['session_id']}")
        except httpx.HTTPError as exc:
            stats["errors"] += 1
            _say(f"  ! {city:<12} not ended: {type(exc).__name__}")
            return
        # 404: its lease lapsed and the hub freed it already
        ended = resp.status_code in (204, 404)
        stats["ended" if ended else "errors"] += 1
        if not ended:
            _say(f"  ! {city:<12} not ended: {_refusal(resp)}")

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            if duration_s is not None and time.monotonic() - started > duration_s:
                stop.set()
                break
            task = asyncio.create_task(user(http))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(users_per_min / 60))
        if tasks:
            await asyncio.wait(tasks, timeout=15)
    _say(f"\nsessions created {stats['created']}, ended {stats['ended']}, "
         f"no capacity {stats['no_capacity']}, errors {stats['errors']}")
    return 0 if interrupted.is_set() or stats["errors"] == 0 else 1


def _shutdown(fleet: Fleet) -> None:
    """Workers first (they drain and deregister), then hubs, then Redis; nothing is left running. A second Ctrl-C
    (or SIGTERM) stops the rest at once instead of waiting for drains; a SIGHUP (the terminal closed after the
    first signal) changes nothing."""
    hurry = False

    def at_once(signum: int, frame: object) -> None:
        nonlocal hurry
        if not hurry:
            _say("stopping the rest now")
        hurry = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, at_once)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _say("stopping: workers drain, then hubs and Redis stop")
        for group, grace in ((fleet.workers, 30.0), (fleet.hubs, 10.0)):
            procs = [part.proc for part in group]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in procs:
                while proc.poll() is None and not hurry and time.monotonic() < deadline:
                    time.sleep(0.05)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if fleet.redis is not None:
            fleet.redis.cleanup()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
