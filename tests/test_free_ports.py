"""The loopback ports the tests and the embedded Redis pick: never one already bound, never one handed out twice, and
never in the kernel's ephemeral range, where any outgoing connection could take it before its user binds it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import shared.redis_server
from shared.redis_server import free_cluster_port, free_port, free_port_run


def test_ports_picked_before_anyone_binds_them_are_all_different_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)] + [free_port_run(3) + offset for offset in range(3)]
    assert len(set(ports)) == len(ports)
    assert all(port in shared.redis_server.PORT_RANGE for port in ports)
    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(ports) < ephemeral_start


def test_a_port_someone_holds_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    first = free_port_run(2)
    monkeypatch.setattr(shared.redis_server, "PORT_RANGE", range(first, first + 2))
    monkeypatch.setattr(shared.redis_server, "_handed_out", set())
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        assert free_port() == first + 1
        with pytest.raises(RuntimeError, match="no free ports"):
            free_port()  # the held one is taken, the other one has been handed out


def test_a_cluster_port_comes_with_its_bus_port_and_neither_is_handed_out_again() -> None:
    port = free_cluster_port()
    assert {port, port + 10000} & {free_port() for _ in range(100)} == set()


def test_processes_the_tests_start_pick_ports_apart_from_every_test_process() -> None:
    child = subprocess.run([sys.executable, "-c", "from shared.redis_server import PORT_RANGE as r, free_port as f; "
                                                  "print(r.start, r.stop, f())"],
                           capture_output=True, text=True, check=True, timeout=30)
    start, stop, picked = map(int, child.stdout.split())
    assert picked in range(start, stop)
    mine = shared.redis_server.PORT_RANGE
    assert stop <= mine.start or start >= mine.stop
    assert range(start, stop)[-1] == shared.redis_server.ALL_PORTS[-1]  # the shares are all below the children's


def test_a_run_of_ports_lies_wholly_inside_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every port of a run is in the process's share, the last one included: a run reaching past it could take a
    port another test process picks from its own share."""
    first = free_port_run(3)
    monkeypatch.setattr(shared.redis_server, "PORT_RANGE", range(first, first + 3))
    for _ in range(30):
        monkeypatch.setattr(shared.redis_server, "_handed_out", set())
        assert free_port_run(2) in (first, first + 1)


def test_every_port_of_a_run_is_handed_out_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of two in a range of two leaves no port to pick: the second port of the run is as taken as the first
    (a fleet of processes given a run must not have one of its ports handed to someone else)."""
    first = free_port_run(2)
    monkeypatch.setattr(shared.redis_server, "PORT_RANGE", range(first, first + 2))
    monkeypatch.setattr(shared.redis_server, "_handed_out", set())
    assert free_port_run(2) == first
    with pytest.raises(RuntimeError, match="no free ports"):
        free_port()


def test_a_cluster_port_whose_bus_port_is_held_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster node also binds port + 10000 for its bus: a port whose bus port someone holds would start a node
    that cannot join its cluster."""
    first = free_cluster_port()
    monkeypatch.setattr(shared.redis_server, "PORT_RANGE", range(first, first + 2))
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 10000))
        for _ in range(20):
            monkeypatch.setattr(shared.redis_server, "_handed_out", set())
            assert free_cluster_port() == first + 1
