"""Plain entry points the ``fleet worker`` commands call; heavy modules are imported inside them."""

from __future__ import annotations

import logging
from typing import Any


def _settings(**overrides: Any) -> Any:
    from worker.settings import WorkerSettings

    # Only explicit CLI values override the environment; None means "as configured".
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


def run_worker(host: str | None = None, port: int | None = None, advertise_url: str | None = None,
               region: str | None = None, simulate_gpu: str | None = None, max_streams: int | None = None,
               engine: str | None = None) -> int:
    """Run the worker agent until it is drained; returns the process exit code."""
    import asyncio

    from worker.agent import WorkerAgent

    settings = _settings(host=host, port=port, advertise_url=advertise_url, region=region,
                         simulate_gpu=simulate_gpu, max_streams=max_streams, engine=engine)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(WorkerAgent(settings).run())


def calibrate(engine: str | None = None, simulate_gpu: str | None = None, max_concurrency: int = 256,
              seconds: float = 2.0) -> int:
    """Measure the concurrency this machine sustains in real time and print it beside the VRAM formula's figure."""
    from worker.calibrate import run
    from worker.capacity import compute_capacity
    from worker.engines import load_engine
    from worker.engines.synthetic import SyntheticEngine
    from worker.gpus import detect_gpus

    settings = _settings(engine=engine, simulate_gpu=simulate_gpu)
    loaded = load_engine(settings.engine, settings)
    if not isinstance(loaded, SyntheticEngine):
        print(f"calibration of engine {loaded.name!r} is not supported yet; only 'synthetic'")
        return 2
    gpus = detect_gpus(settings.simulate_gpu)
    formula = compute_capacity(gpus, loaded.profile)
    print(f"GPUs: {[g.name for g in gpus] or 'none'}; VRAM/CPU/RAM formula: {formula.max_streams} streams "
          f"(limited by {formula.reason})")
    result = run(loaded, max_concurrency, seconds)
    print(f"real-time limit of this host's CPU for the synthetic engine: {result.capacity} streams")
    return 0
