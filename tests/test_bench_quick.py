"""Each benchmark's --quick mode runs end to end and prints its figures (the full runs are in BENCHMARKS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(module: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", module, "--quick"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_allocation_quick() -> None:
    out = _run("bench.allocation")
    for needle in ("alloc N=   100:", "alloc N=  1000:", "health N=", "baseline N=", "alloc/s", "p99",
                   "scaling N=", "allocation / health floor", "vs original design", "create N=  1000:",
                   "creation alone / health floor"):
        assert needle in out, out
    for line in out.splitlines():
        if line.startswith(("alloc N=", "create N=")):
            assert line.endswith("errors {}"), line  # every create, and every end, answered as it should


def test_heartbeats_quick() -> None:
    out = _run("bench.heartbeats")
    for transport in ("HTTP POST", "WebSocket channel"):
        assert f"heartbeats N=1000 over {transport}:" in out, out
    assert "one hub process absorbs" in out and "needed at 3 s interval" in out, out


def test_routing_quick() -> None:
    pytest.importorskip("scipy")
    out = _run("bench.routing")
    for policy in ("hub-spread", "hub-pack", "original", "nearest", "least-loaded", "round-robin", "random"):
        assert policy in out, out
    assert "hub spread / optimum mean distance" in out and "hub false rejects: 0 " in out, out
    assert "2 hubs refreshing every 1 s, heartbeats every 3 s" in out, out  # the hub's own timings
    refused = int(out.split("reservations refused on a stale board and re-ranked: ")[1].split()[0])
    assert refused > 0, out  # the path a false reject would come from is exercised
    assert "GPU-h" in out, out


def test_sre_views_quick() -> None:
    out = _run("bench.sre_views")
    for view in ("/api/v1/workers?limit=500", "/api/v1/fleet", "/api/v1/sessions?limit=200", "/metrics"):
        assert f"  {view} " in out and "ms of hub CPU" in out, out
    assert "dashboard refresh:" in out and "whole listing: 200 workers in 1 pages" in out, out
    assert "N=   200 workers, 50 sessions:" in out, out  # every session was placed
