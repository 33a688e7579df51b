"""Heartbeats per second one hub process absorbs with N registered workers (default 10,000).

Workers are registered through FleetStore.register; a separate load-generator process then sends real
``POST /api/v1/workers/{id}/heartbeat`` requests (worker token + X-Worker-Secret, status fields, no sessions)
round-robin over all N workers with C concurrent connections, so every worker stays live during the run.

    .venv/bin/python -m bench.heartbeats
    .venv/bin/python -m bench.heartbeats --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

from bench.common import (
    PY,
    ROOT,
    WORKER_TOKEN,
    Procs,
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
    n = args.workers or (1000 if args.quick else 10000)
    duration = 1.5 if args.quick else 15.0
    procs = Procs()
    server = redis_server()
    try:
        wport = start_fake_workers(procs)
        secrets = asyncio.run(register_fleet(server.url, n, wport))
        hub, base = start_hub(procs, server.url)
        time.sleep(1.5)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(secrets, f)
        res = run_json([PY, "-m", "bench.loadgen", "--url", base, "--mode", "heartbeat", "--concurrency",
                        str(args.concurrency), "--duration", str(duration), "--warmup", "0.5" if args.quick else "2",
                        "--secrets", f.name, "--token", WORKER_TOKEN, "--hub-pid", str(hub.pid)])
    finally:
        procs.close()
        server.stop()
    needed = n / args.interval
    res.update(workers=n, interval_s=args.interval, needed_per_s=round(needed, 1),
               load_share=round(needed / res["per_s"], 3) if res["per_s"] else None)
    print(f"heartbeats N={n}: {res['per_s']:.1f}/s  p50 {res['p50_ms']} ms  p99 {res['p99_ms']} ms"
          f"  errors {res['errors']}")
    print(f"needed at {args.interval:g} s interval: {needed:.0f}/s = {res['load_share']:.0%} of one hub's capacity"
          f" (target < 50%)")
    out = ROOT / "bench" / "results" / ("heartbeats_quick.json" if args.quick else "heartbeats.json")
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
