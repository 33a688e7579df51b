"""Plain entry points the ``fleet worker`` commands call; heavy modules are imported inside them."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from pydantic import ValidationError

from shared.settings import describe_invalid

#: Exit code of a command refused for its options or configuration.
EXIT_USAGE = 2


def _settings(**overrides: Any) -> Any:
    from worker.settings import WorkerSettings

    # Only explicit CLI values override the environment; None means "as configured".
    return WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})


def _refuse(message: str) -> int:
    print(f"fleet worker: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_worker(host: str | None = None, port: int | None = None, advertise_url: str | None = None,
               region: str | None = None, simulate_gpu: str | None = None, max_streams: int | None = None,
               engine: str | None = None) -> int:
    """Run the worker agent until it is drained; returns the process exit code."""
    import asyncio

    from worker.agent import CannotStart, WorkerAgent
    from worker.engines import EngineUnavailable
    from worker.voice.errors import VoiceError

    try:
        settings = _settings(host=host, port=port, advertise_url=advertise_url, region=region,
                             simulate_gpu=simulate_gpu, max_streams=max_streams, engine=engine)
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        agent = WorkerAgent(settings)
    except ValidationError as exc:
        return _refuse(describe_invalid(exc))
    except (EngineUnavailable, VoiceError) as exc:  # VoiceError: a missing model file, named with its setting
        return _refuse(str(exc))
    try:
        return asyncio.run(agent.run())
    except (CannotStart, VoiceError) as exc:  # known only once the agent reads the IMDS or GPUs, binds, loads models
        return _refuse(str(exc))


def calibrate(engine: str | None = None, simulate_gpu: str | None = None, max_concurrency: int | None = None,
              seconds: float | None = None) -> int:
    """Measure the concurrency this machine sustains in real time and print it beside the VRAM formula's figure.

    ``max_concurrency`` bounds the search (else ``FLEET_MAX_STREAMS``, else 256); ``seconds`` is the measured
    window of each step (default 2 s for the synthetic engine, 6 s for voice, whose turns take ~4 s).
    """
    from shared.models import MAX_STREAMS_PER_WORKER
    from worker.calibrate import DEFAULT_MAX_CONCURRENCY, CalibrationFailed, run
    from worker.capacity import compute_capacity
    from worker.engine import Calibratable
    from worker.engines import EngineUnavailable, load_engine
    from worker.gpus import GpuProbeFailed, detect_gpus
    from worker.voice.errors import VoiceError

    if max_concurrency is not None and not 1 <= max_concurrency <= MAX_STREAMS_PER_WORKER:
        return _refuse(f"--max-streams must be 1 to {MAX_STREAMS_PER_WORKER} (the most streams tried), "
                       f"not {max_concurrency}")
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        return _refuse(f"--seconds must be a number above 0 (seconds measured per step), not {seconds:g}")
    try:
        settings = _settings(engine=engine, simulate_gpu=simulate_gpu)
        loaded = load_engine(settings.engine, settings, for_calibration=True)
    except ValidationError as exc:
        return _refuse(describe_invalid(exc))
    except (EngineUnavailable, VoiceError) as exc:  # VoiceError: a missing model file, named with its setting
        return _refuse(str(exc))
    if not isinstance(loaded, Calibratable):
        return _refuse(f"engine {loaded.name!r} has no load probe (load_probe()), so it cannot be calibrated")
    try:
        gpus = detect_gpus(settings.simulate_gpu)
    except GpuProbeFailed as exc:
        return _refuse(f"cannot read the GPUs: {exc}")
    formula = compute_capacity(gpus, loaded.profile)
    print(f"GPUs: {[g.name for g in gpus] or 'none'}; VRAM/CPU/RAM formula: {formula.max_streams} streams "
          f"(limited by {formula.reason})")
    llm = getattr(loaded, "llm_name", None)  # engines that talk to an LLM say which one answers
    if llm is not None:
        print(f"LLM for calibration: {llm}")
    limit = max_concurrency if max_concurrency is not None else settings.max_streams
    if limit is None:
        limit = DEFAULT_MAX_CONCURRENCY
    elif limit < 1:  # FLEET_MAX_STREAMS=0 is a worker that takes nothing: no bound for a search
        return _refuse("FLEET_MAX_STREAMS=0 bounds no search; pass --max-streams 1 or more")
    try:
        result = run(loaded, limit, seconds or (6.0 if loaded.name == "voice" else 2.0))
    except CalibrationFailed as exc:
        print(f"calibration failed: {exc}")
        return 1
    except VoiceError as exc:  # a model folder or backend package is missing: found when the engine starts
        return _refuse(str(exc))
    bound = "at least " if result.reached_max else ""
    print(f"real-time limit of this host for the {loaded.name} engine: {bound}{result.capacity} streams")
    return 0
