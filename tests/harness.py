"""Real processes for fault and concurrency tests: `fleet hub` and `fleet worker` subprocesses on loopback.

Each process writes its log to a temporary file rather than a pipe: a pipe nobody reads fills after 64 KB and then
blocks the process (a hub logging every refused request during a Redis outage would freeze).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

import httpx

from shared.children import ended_with_this_process
from shared.redis_server import free_port
from tests.conftest import ADMIN_TOKEN, WORKER_AUTH, WORKER_TOKEN


def _log_file() -> IO[bytes]:
    # Append mode: the child's writes always land at the end even while the test seeks to read the file.
    return tempfile.TemporaryFile("a+b")


def _child_env(**fleet: Any) -> dict[str, str]:
    """This environment without any FLEET_* (a developer's shell must not leak in), plus the given settings."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
            **{f"FLEET_{k.upper()}": str(v) for k, v in fleet.items()}}


class FleetProcess:
    """A `python -m cli.main ...` child on a loopback port: its log, its URL, and signals to stop it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the process's stderr, for failure messages."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def _spawn(self, *args: str) -> None:
        self._log = self._log or _log_file()
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args, "--host", "127.0.0.1",
                                      "--port", str(self.port)],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=self._log,
                                     preexec_fn=ended_with_this_process())  # a killed test run leaves none behind

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> bool:
        """Poll ``ready`` (HTTP errors count as not yet) until it holds; False on timeout; raises if the process
        exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{what} exited with {code}: {self.log_tail()}")
            try:
                if ready():
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL: no drain, no clean-up, as a crashed instance."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self) -> None:
        """SIGTERM, without waiting."""
        if self.running:
            assert self.proc is not None
            self.proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it takes longer than ``timeout_s``. Returns the exit code."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode


class HubProcess(FleetProcess):
    """One `fleet hub` process; ``start()`` returns once /ready answers."""

    def __init__(self, redis_url: str | None, *, processes: int = 1, **settings: Any) -> None:
        """``redis_url=None``: no ``FLEET_REDIS_URL``, so the hub starts an embedded redis-server (dev)."""
        store = {} if redis_url is None else {"redis_url": redis_url}
        super().__init__(_child_env(**{
            **store, "worker_token": WORKER_TOKEN, "admin_token": ADMIN_TOKEN, "rate_limit_per_s": 0,
            "snapshot_refresh_s": 0.2, "log_level": "WARNING", **settings}))
        self.processes = processes

    def start(self, timeout_s: float = 20.0) -> HubProcess:
        self._spawn("hub", "--workers", str(self.processes))
        if self._wait_until(lambda: httpx.get(f"{self.url}/ready", timeout=0.5).status_code == 200, timeout_s, "hub"):
            return self
        self.stop()
        raise RuntimeError("hub did not become ready")


@contextlib.contextmanager
def running_hubs(count: int, redis_url: str, **settings: Any) -> Iterator[list[HubProcess]]:
    """``count`` ready hub processes sharing one Redis; all stopped on exit, even if one failed to start."""
    hubs = [HubProcess(redis_url, **settings) for _ in range(count)]
    try:
        for hub in hubs:
            hub.start()
        yield hubs
    finally:
        for hub in hubs:
            hub.stop()


class WorkerProcess(FleetProcess):
    """One real `fleet worker` process (synthetic engine, simulated GPU) on a fixed loopback port.

    ``spawn()`` starts it, ``wait_ready()`` returns once it has registered with a hub; ``start()`` does both;
    ``terminate()`` makes it drain (report draining, wait for sessions, deregister) and exit by itself. The
    port and id survive ``kill()`` so a restart is the same worker coming back. Settings are ``FLEET_*`` names in
    lower case (``drain_timeout_s=1``); the IMDS endpoint points at a closed port so it learns at once it is not on
    EC2, and registration retries are capped at 1 s so a restart re-registers soon after the old TTL lapses.
    """

    def __init__(self, hub_urls: list[str], worker_id: str, *, region: str = "us-east-1", max_streams: int = 4,
                 gpu: str = "t4", **settings: Any) -> None:
        self.worker_id = worker_id
        self.region = region
        self.max_streams = max_streams
        self.gpu = gpu
        super().__init__(_child_env(**{
            "hub_urls": ",".join(hub_urls), "worker_token": WORKER_TOKEN, "worker_id": worker_id,
            "imds_url": f"http://127.0.0.1:{free_port()}", "imds_timeout_s": 0.2, "register_backoff_cap_s": 1.0,
            "hub_timeout_s": 2.0, "drain_timeout_s": 5.0, "log_level": "WARNING", **settings,
        }))

    def spawn(self) -> WorkerProcess:
        self._spawn("worker", "--engine", "synthetic", "--simulate-gpu", self.gpu, "--region", self.region,
                    "--max-streams", str(self.max_streams))
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> WorkerProcess:
        """Until its /health says it registered with a hub."""
        if self._wait_until(lambda: bool(self.health(timeout_s=0.5).get("registered")), timeout_s,
                            f"worker {self.worker_id}"):
            return self
        raise RuntimeError(f"worker {self.worker_id} did not register: {self.log_tail()}")

    def start(self, timeout_s: float = 30.0) -> WorkerProcess:
        return self.spawn().wait_ready(timeout_s)

    def health(self, timeout_s: float = 2.0) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/health", timeout=timeout_s).json()
        return answer

    def sessions(self, timeout_s: float = 5.0) -> list[str]:
        """The ids of the sessions the worker itself runs (its own GET /sessions, worker token auth)."""
        resp = httpx.get(f"{self.url}/sessions", headers=WORKER_AUTH, timeout=timeout_s)
        resp.raise_for_status()
        return sorted(s["session_id"] for s in resp.json())



@contextlib.contextmanager
def running_workers(hub_urls: list[str], count: int, *, prefix: str = "wp",
                    regions: tuple[str, ...] = ("us-east-1", "us-west-2", "eu-central-1"), max_streams: int = 4,
                    **settings: Any) -> Iterator[list[WorkerProcess]]:
    """``count`` registered `fleet worker` processes (started together), spread over ``regions``; all stopped on
    exit (SIGTERM, then SIGKILL), even if one failed to start."""
    workers = [WorkerProcess(hub_urls, f"{prefix}-{i:02d}", region=regions[i % len(regions)],
                             max_streams=max_streams, **settings) for i in range(count)]
    try:
        for worker in workers:
            worker.spawn()
        for worker in workers:
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.stop()
