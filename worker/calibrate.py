"""Measure how many concurrent streams an engine sustains in real time on this machine.

Concurrency rises 1, 2, 4, … until a level misses real time (more than ``miss_budget`` of frames start late, or
p95 frame latency above the frame period); the capacity is then bisected between the last good and first bad level.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from shared.models import SessionDispatch
from worker.engines.synthetic import SyntheticEngine


@dataclass(frozen=True, slots=True)
class Trial:
    concurrency: int
    p95_ms: float
    miss_ratio: float
    ok: bool


@dataclass(frozen=True, slots=True)
class Calibration:
    capacity: int
    frame_period_ms: float
    trials: list[Trial]


async def _trial(engine: SyntheticEngine, concurrency: int, seconds: float, miss_budget: float) -> Trial:
    engine.reset_counters()
    ids = [f"calib-{concurrency}-{i}" for i in range(concurrency)]
    for sid in ids:
        await engine.start_session(SessionDispatch(session_id=sid, room=sid, livekit_url="ws://calib", token="-"),  # noqa: S106 - no LiveKit here
                                   lambda *_: None)
    await asyncio.sleep(seconds / 4)  # let the cadence settle before measuring
    engine.reset_counters()
    await asyncio.sleep(seconds)
    stats, misses = engine.stats(), engine.miss_ratio()
    await engine.aclose()
    ok = misses <= miss_budget and stats.latency_ms <= engine.frame_period_s * 1000
    return Trial(concurrency, stats.latency_ms, round(misses, 4), ok)


async def calibrate(engine: SyntheticEngine, max_concurrency: int = 256, seconds: float = 2.0,
                    miss_budget: float = 0.02) -> Calibration:
    await engine.start()
    trials: list[Trial] = []
    good, bad, level = 0, None, 1
    while level <= max_concurrency:
        trial = await _trial(engine, level, seconds, miss_budget)
        trials.append(trial)
        if not trial.ok:
            bad = level
            break
        good = level
        level *= 2
    if bad is None:
        bad = max_concurrency + 1
        if good < max_concurrency:
            trial = await _trial(engine, max_concurrency, seconds, miss_budget)
            trials.append(trial)
            good, bad = (max_concurrency, bad) if trial.ok else (good, max_concurrency)
    while bad - good > 1:
        mid = (good + bad) // 2
        trial = await _trial(engine, mid, seconds, miss_budget)
        trials.append(trial)
        good, bad = (mid, bad) if trial.ok else (good, mid)
    return Calibration(good, engine.frame_period_s * 1000, trials)


def run(engine: SyntheticEngine, max_concurrency: int = 256, seconds: float = 2.0) -> Calibration:
    started = time.monotonic()
    result = asyncio.run(calibrate(engine, max_concurrency, seconds))
    for t in result.trials:
        print(f"  {t.concurrency:>5} streams  p95 {t.p95_ms:7.2f} ms  late frames {t.miss_ratio:6.2%}  "
              f"{'ok' if t.ok else 'MISSES REAL TIME'}")
    print(f"capacity: {result.capacity} streams at {1000 / result.frame_period_ms:.0f} fps "
          f"(measured in {time.monotonic() - started:.0f}s)")
    return result
