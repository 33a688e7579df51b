"""PNG plots of the results in bench/results/*.json (run the benches first).

    .venv/bin/python -m bench.plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RES = Path(__file__).resolve().parent / "results"


def allocation() -> None:
    data = json.loads((RES / "allocation.json").read_text())
    rows = data["rows"]
    n = [r["workers"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["per_s"] for r in rows], "o-", label="hub allocations/s")
    if data.get("health"):
        a.axhline(data["health"]["per_s"], color="grey", ls="--", label="GET /health (HTTP floor)")
    for bl in data.get("baseline", []):
        a.plot([bl["workers"]], [bl["per_s"]], "x", ms=10, label=f"{bl['mode']} (original design)")
    a.set_xscale("log"), a.set_yscale("log"), a.set_xlabel("registered workers"), a.set_ylabel("per second")
    a.legend(fontsize=8), a.set_title("Throughput (one hub process, 2 cores)")
    b.plot(n, [r["p50_ms"] for r in rows], "o-", label="p50")
    b.plot(n, [r["p99_ms"] for r in rows], "o-", label="p99")
    b.set_xscale("log"), b.set_xlabel("registered workers"), b.set_ylabel("ms"), b.legend()
    b.set_title(f"POST /api/v1/sessions latency, {data['concurrency']} clients")
    fig.tight_layout()
    fig.savefig(RES / "allocation.png", dpi=110)


def routing() -> None:
    data = json.loads((RES / "routing.json").read_text())
    rows = data["rows"]
    names = [r["policy"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    a.bar([i - 0.2 for i in x], [r["mean_km"] for r in rows], 0.4, label="mean")
    a.bar([i + 0.2 for i in x], [r["p95_km"] for r in rows], 0.4, label="p95")
    a.set_xticks(list(x), names, rotation=30, ha="right"), a.set_ylabel("user → worker km"), a.legend()
    a.set_title("Distance by policy (24 h trace)")
    b.bar(list(x), [r["gpu_hours"] for r in rows], color="tab:green")
    b.set_xticks(list(x), names, rotation=30, ha="right"), b.set_ylabel("GPU-hours (10 min scale-in cool-down)")
    b.set_title("GPU-hours by policy")
    fig.tight_layout()
    fig.savefig(RES / "routing.png", dpi=110)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    allocation()
    routing()
    print("wrote", RES / "allocation.png", RES / "routing.png")


if __name__ == "__main__":
    main()
