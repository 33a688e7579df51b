"""`fleet demo` brings a whole fleet up, serves synthetic users, and leaves nothing running when it stops."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import psutil

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


def test_sigterm_while_the_fleet_starts_leaves_nothing_running(tmp_path) -> None:
    hub_port, worker_port = free_port_run(2), free_port_run(3)
    demo = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "demo", "--workers", "3", "--hub-port", str(hub_port), "--worker-port",
         str(worker_port), "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        started: list[psutil.Process] = []
        deadline = time.monotonic() + 30
        while len(started) < 3 and time.monotonic() < deadline:  # redis-server and both hubs, still starting
            started = psutil.Process(demo.pid).children(recursive=True)
            time.sleep(0.02)
        assert len(started) >= 3, "the demo did not start its Redis and hubs"
        demo.send_signal(signal.SIGTERM)
        _, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    # 130 when it came while starting (nearly always); 0 if the fleet had just got up and the users loop stopped
    assert demo.returncode in (130, 0) and "Traceback" not in err, err[-2000:]
    alive = [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left running: {alive}"
    assert not _listening(hub_port)


def test_a_demo_without_a_known_region_says_so_before_starting_anything(tmp_path) -> None:
    for regions, said in ((",", "names no region"), ("us-east-1,mars-north-1", "unknown region mars-north-1")):
        done = subprocess.run([sys.executable, "-m", "cli.main", "demo", "--regions", regions, "--log-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
