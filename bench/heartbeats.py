"""Heartbeats per second one hub process absorbs with N registered workers (default 10,000).

Workers are registered through FleetStore.register; a separate load-generator process then sends real heartbeats
(worker token + X-Worker-Secret, status fields, no sessions) round-robin over all N workers, first as
``POST /api/v1/workers/{id}/heartbeat`` requests over C keep-alive connections, then as messages on one WebSocket
heartbeat channel per worker (N channels open, C in flight) — the transport ``fleet worker`` uses.

A hub process is single-threaded, and on this 2-core machine it shares the cores with Redis and the load
generator, so its capacity is measured as heartbeats per second of the hub's own CPU time (psutil).

    .venv/bin/python -m bench.heartbeats
    .venv/bin/python -m bench.heartbeats --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.common import (
    PY,
    ROOT,
    WORKER_TOKEN,
    Procs,
    record_printout,
    redis_server,
    register_fleet,
    run_json,
    start_fake_workers,
    start_hub,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--interval", type=float, default=3.0)
    args = ap.parse_args()
    # Only a run with the recorded options replaces the record BENCHMARKS.md quotes; others write beside it.
    kind = "quick" if args.quick else "full" if (args.workers, args.concurrency, args.interval) == (
        None, 32, 3.0) else "custom"
    if kind == "full":
        record_printout(ROOT / "bench" / "results" / "heartbeats.txt")
    n = args.workers or (1000 if args.quick else 10000)
    duration = 1.5 if args.quick else 15.0
    procs = Procs()
    server = redis_server()
    rows: dict[str, dict] = {}
    try:
        wport = start_fake_workers(procs)
        secrets = asyncio.run(register_fleet(server.url, n, wport))
        hub, base = start_hub(procs, server.url)
        time.sleep(1.5)
        # The workers' secrets, for the load generator only: gone with the run.
        with tempfile.TemporaryDirectory(prefix="bench-heartbeats-") as scratch:
            secrets_file = Path(scratch) / "secrets.json"
            secrets_file.write_text(json.dumps(secrets))
            warmup = "0.5" if args.quick else "2"
            for mode in ("heartbeat", "heartbeat-ws"):
                res = run_json([PY, "-m", "bench.loadgen", "--url", base, "--mode", mode, "--concurrency",
                                str(args.concurrency), "--duration", str(duration), "--warmup", warmup,
                                "--secrets", str(secrets_file), "--token", WORKER_TOKEN, "--hub-pid", str(hub.pid)])
                rows[mode] = res
    finally:
        procs.close()
        server.stop()
    needed = n / args.interval
    for mode, res in rows.items():
        transport = "WebSocket channel" if mode == "heartbeat-ws" else "HTTP POST"
        res.update(workers=n, interval_s=args.interval, needed_per_s=round(needed, 1), transport=transport,
                   load_share=round(needed / res["hub_capacity_per_s"], 3) if res.get("hub_capacity_per_s") else None)
        print(f"heartbeats N={n} over {transport}: {res['per_s']:.1f}/s measured (p50 {res['p50_ms']} ms,"
              f" p99 {res['p99_ms']} ms, errors {res['errors']}); hub CPU {res.get('hub_cpu_ms_per_op')} ms each"
              f" -> one hub process absorbs {res.get('hub_capacity_per_s')}/s")
        share = "unknown (the hub recorded no heartbeat)" if res["load_share"] is None else f"{res['load_share']:.0%}"
        print(f"  needed at {args.interval:g} s interval: {needed:.0f}/s = {share} of one hub process"
              f" (target < 50%)")
    out = ROOT / "bench" / "results" / ("heartbeats.json" if kind == "full" else f"heartbeats_{kind}.json")
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
