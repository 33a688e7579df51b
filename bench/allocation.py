"""Allocation throughput and latency of one real hub process over a real redis-server.

For each fleet size N: flush Redis, register N workers (4 streams each, 10 regions) through FleetStore.register,
start ``fleet hub`` (uvicorn), then a separate load-generator process runs C closed-loop clients that create a
session (POST /api/v1/sessions; the hub reserves, dispatches to a fake worker endpoint, confirms) and end it
(DELETE). GET /health with the same clients gives the HTTP floor; at the largest N, creations alone (sessions
left running, as when workers report their ends) show what the end's request costs. The original design
(bench/baselines) runs at the largest N. Workers are kept live by FLEET_WORKER_TTL_S=600 (heartbeat load is
measured by bench/heartbeats).

    .venv/bin/python -m bench.allocation            # N = 100, 1000, 10000
    .venv/bin/python -m bench.allocation --quick    # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import redis

from bench.common import (
    BENCH_REGIONS,
    PY,
    ROOT,
    Procs,
    record_printout,
    redis_server,
    register_fleet,
    run_json,
    start_fake_workers,
    start_hub,
)

TTL_S = "600"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    # Only a run with the recorded options replaces the record BENCHMARKS.md quotes; others write beside it.
    kind = "quick" if args.quick else "full" if (args.sizes, args.duration, args.no_baseline, args.concurrency) == (
        None, None, False, 32) else "custom"
    if kind == "full":
        record_printout(ROOT / "bench" / "results" / "allocation.txt")
    sizes = [int(x) for x in (args.sizes or ("100,1000" if args.quick else "100,1000,10000")).split(",")]
    duration = args.duration or (1.5 if args.quick else 15.0)
    warmup = "0.5" if args.quick else "2"
    procs = Procs()
    server = redis_server()
    rows: list[dict] = []
    try:
        wport = start_fake_workers(procs)
        health: dict | None = None
        create: dict | None = None
        for n in sizes:
            redis.Redis.from_url(server.url).flushall()
            t0 = time.perf_counter()
            asyncio.run(register_fleet(server.url, n, wport))
            reg_s = time.perf_counter() - t0
            hub, base = start_hub(procs, server.url, FLEET_WORKER_TTL_S=TTL_S)
            time.sleep(1.5)  # first board refresh
            loadgen = [PY, "-m", "bench.loadgen", "--url", base, "--concurrency", str(args.concurrency),
                       "--duration", str(duration), "--warmup", warmup, "--hub-pid", str(hub.pid)]
            res = run_json([*loadgen, "--mode", "alloc"])
            res.update(workers=n, register_s=round(reg_s, 1))
            rows.append(res)
            print(f"alloc N={n:>6}: {res['per_s']:>8.1f} alloc/s  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms"
                  f"  errors {res['errors']}", flush=True)
            if n == sizes[-1]:
                health = run_json([*loadgen, "--mode", "health"])
                health["workers"] = n
                print(f"health N={n:>6}: {health['per_s']:>8.1f} req/s  p50 {health['p50_ms']} ms"
                      f"  p99 {health['p99_ms']} ms", flush=True)
                create = run_json([*loadgen, "--mode", "create"])  # last: its sessions stay
                create["workers"] = n
                print(f"create N={n:>6}: {create['per_s']:>8.1f} creations/s (no end)  p50 {create['p50_ms']} ms"
                      f"  p99 {create['p99_ms']} ms  errors {create['errors']}", flush=True)
            procs.stop(hub)
        baseline = []
        if not args.no_baseline:
            n = sizes[-1]
            bdur = "1.5" if args.quick else "20"
            for extra in ([], ["--pipelined"]):
                b = run_json([PY, "-m", "bench.baselines.original_router", "--redis", server.url, "--workers", str(n),
                              "--regions", ",".join(BENCH_REGIONS), "--concurrency", "8", "--duration", bdur, *extra])
                baseline.append(b)
                print(f"{b['mode']} N={n:>6}: {b['per_s']:>8.2f} alloc/s  p50 {b['p50_ms']} ms  p99 {b['p99_ms']} ms",
                      flush=True)
    finally:
        procs.close()
        server.stop()
    first, last = rows[0], rows[-1]
    summary = {
        "scaling_ratio": round(last["per_s"] / first["per_s"], 3),
        "vs_health": round(last["per_s"] / health["per_s"], 3) if health else None,
        "create_vs_health": round(create["per_s"] / health["per_s"], 3) if health and create else None,
        "vs_baseline": round(last["per_s"] / baseline[0]["per_s"], 1) if baseline and baseline[0]["per_s"] else None,
        "vs_baseline_pipelined": (round(last["per_s"] / baseline[1]["per_s"], 1)
                                  if len(baseline) > 1 and baseline[1]["per_s"] else None),
        "p99_over_p50": round(last["p99_ms"] / last["p50_ms"], 2),
    }
    print(f"scaling N={last['workers']}/N={first['workers']}: {summary['scaling_ratio']:.0%} (target >= 70%)")
    if summary["vs_health"] is not None:
        print(f"allocation / health floor: {summary['vs_health']:.0%} (target >= 40%)")
    if summary["create_vs_health"] is not None:
        print(f"creation alone / health floor: {summary['create_vs_health']:.0%}")
    if summary["vs_baseline"] is not None:
        print(f"vs original design: {summary['vs_baseline']}x (pipelined variant {summary['vs_baseline_pipelined']}x;"
              f" target >= 100x)")
    print(f"p99/p50 at N={last['workers']}: {summary['p99_over_p50']} (target <= 3)")
    out = ROOT / "bench" / "results" / ("allocation.json" if kind == "full" else f"allocation_{kind}.json")
    out.write_text(json.dumps({"rows": rows, "health": health, "create": create, "baseline": baseline,
                               "summary": summary,
                               "concurrency": args.concurrency, "duration_s": duration}, indent=2))


if __name__ == "__main__":
    main()
