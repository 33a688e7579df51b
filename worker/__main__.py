"""``python -m worker [--port N] [--simulate-gpu a10g] …``: the agent without the ``fleet`` CLI."""

from __future__ import annotations

import argparse
import sys

from worker.cli import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--advertise-url")
    parser.add_argument("--region")
    parser.add_argument("--simulate-gpu")
    parser.add_argument("--max-streams", type=int)
    parser.add_argument("--engine")
    args = parser.parse_args(argv)
    return run_worker(args.host, args.port, args.advertise_url, args.region, args.simulate_gpu, args.max_streams,
                      args.engine)


if __name__ == "__main__":
    sys.exit(main())
