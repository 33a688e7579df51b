"""`fleet demo` brings a whole fleet up, serves synthetic users, and leaves nothing running when it stops."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from shared.redis_server import free_port_run


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_runs_a_fleet_and_stops_cleanly(tmp_path) -> None:
    # Two hubs and three workers on consecutive ports, clear of the ports the kernel hands out (the demo's own
    # redis-server took the second hub's port once, when these came from free_port()).
    hub_port = free_port_run(2)
    worker_port = free_port_run(3)
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--duration", "10", "--users-per-min", "240",
         "--mean-session-s", "3", "--hub-port", str(hub_port), "--worker-port", str(worker_port),
         "--log-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=150,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"http://127.0.0.1:{hub_port}/dashboard" in done.stdout and "admin token" in done.stdout
    created = int(re.search(r"sessions created (\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert created > 0
    assert "errors 0" in done.stdout
    for port in (hub_port, hub_port + 1, worker_port, worker_port + 1, worker_port + 2):
        assert not _listening(port), f"port {port} still served after the demo stopped"


def test_demo_says_at_once_why_a_hub_did_not_start(tmp_path) -> None:
    hub_port, worker_port = free_port_run(2), free_port_run(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", hub_port + 1))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--duration", "5", "--hub-port",
             str(hub_port), "--worker-port", str(worker_port), "--log-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"127.0.0.1:{hub_port + 1}/ready exited with code" in done.stderr
    assert "address already in use" in done.stderr
    assert not _listening(hub_port), "the first hub was left running"
