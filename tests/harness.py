"""Real processes for fault and concurrency tests: hubs started as `fleet hub` subprocesses on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from shared.redis_server import free_port
from tests.conftest import ADMIN_TOKEN, WORKER_TOKEN


class HubProcess:
    """One `fleet hub` process; ``start()`` returns once /ready answers."""

    def __init__(self, redis_url: str, **settings: Any) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
            "FLEET_REDIS_URL": redis_url, "FLEET_WORKER_TOKEN": WORKER_TOKEN, "FLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "FLEET_RATE_LIMIT_PER_S": "0", "FLEET_SNAPSHOT_REFRESH_S": "0.2", "FLEET_LOG_LEVEL": "WARNING",
            **{f"FLEET_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> HubProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "hub", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"hub exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("hub did not become ready")

    def kill(self) -> None:
        """SIGKILL: the hub dies mid-request, as a crashed instance would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


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
