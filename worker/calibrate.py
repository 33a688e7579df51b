"""Measure how many concurrent streams an engine sustains in real time on this machine.

One code path for every engine: each step starts N sessions through ``start_session``, lets the engine's
``LoadProbe`` drive them like real users, waits a warm-up, then measures one window. A step keeps real time when
at most ``late_budget`` of its deadlines were missed and its p95 latency stays within the engine's budget (see
``RealTimeReport``). Concurrency rises 1, 2, 4, … until a step misses real time; the capacity is then bisected
between the last good and the first bad level.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from shared.models import SessionDispatch
from worker.engine import Calibratable, Engine, RealTimeReport

log = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 256


class CalibrationFailed(RuntimeError):
    """A step could not be measured (a session refused to start, a load driver crashed)."""


@dataclass(frozen=True, slots=True)
class Trial:
    concurrency: int
    report: RealTimeReport
    ok: bool

    @property
    def p95_ms(self) -> float:
        return self.report.p95_ms

    @property
    def miss_ratio(self) -> float:
        return self.report.late_ratio


@dataclass(frozen=True, slots=True)
class Calibration:
    capacity: int
    budget_ms: float
    trials: list[Trial]
    reached_max: bool
    """True when even ``max_concurrency`` kept real time: the capacity is at least that, not measured."""


class CalibratedEngine(Engine, Calibratable, Protocol):
    """What ``calibrate`` needs: an engine that also hands out load probes."""


def _spec(session_id: str) -> SessionDispatch:
    # Calibration sessions join no LiveKit room; the probe feeds them directly.
    return SessionDispatch(session_id=session_id, room=session_id, livekit_url="ws://calibration.invalid",
                           token="-")  # noqa: S106 - not a credential


async def _trial(engine: CalibratedEngine, concurrency: int, seconds: float, late_budget: float) -> Trial:
    probe = engine.load_probe()
    ids = [f"calib-{concurrency}-{i}" for i in range(concurrency)]
    started: list[str] = []
    drivers: list[asyncio.Task[None]] = []
    try:
        for sid in ids:
            try:
                await engine.start_session(_spec(sid), lambda *_: None)
            except Exception as exc:
                raise CalibrationFailed(f"the engine refused calibration session {sid}: {exc}") from exc
            started.append(sid)
            drivers.append(asyncio.create_task(probe.drive(sid), name=f"calibrate-{sid}"))
        await asyncio.sleep(max(seconds / 4, probe.warmup_s))  # let the cadence settle before measuring
        probe.reset()
        await asyncio.sleep(seconds)
        report = probe.report()
        crashed = next((t for t in drivers if t.done() and not t.cancelled() and t.exception()), None)
        if crashed is not None:
            raise CalibrationFailed(f"load driver {crashed.get_name()} crashed: {crashed.exception()!r}")
    finally:
        for task in drivers:
            task.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        for sid in started:
            with contextlib.suppress(Exception):
                await engine.stop_session(sid)
    return Trial(concurrency, report, report.keeps_real_time(late_budget))


async def calibrate(engine: CalibratedEngine, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                    seconds: float = 2.0, late_budget: float = 0.02, resolution: float = 0.0) -> Calibration:
    """Start the engine, find its real-time limit, close it.

    ``resolution``: stop bisecting once the first bad level is within this fraction of the last good one
    (0: to the exact stream; 0.25 saves a few steps when a rough figure will do)."""
    await engine.start()
    trials: list[Trial] = []

    async def step(level: int) -> bool:
        trial = await _trial(engine, level, seconds, late_budget)
        trials.append(trial)
        log.info("%s", describe(trial))
        return trial.ok

    try:
        good, bad, level = 0, None, 1
        while level <= max_concurrency:
            if not await step(level):
                bad = level
                break
            good = level
            level *= 2
        if bad is None:
            bad = max_concurrency + 1
            if good < max_concurrency:
                good, bad = (max_concurrency, bad) if await step(max_concurrency) else (good, max_concurrency)
        while bad - good > max(1, int(good * resolution)):
            mid = (good + bad) // 2
            good, bad = (mid, bad) if await step(mid) else (good, mid)
    finally:
        await engine.aclose()
    budget = trials[-1].report.budget_ms if trials else 0.0
    return Calibration(good, budget, trials, reached_max=good >= max_concurrency)


def describe(trial: Trial) -> str:
    r = trial.report
    figures = "  ".join(f"{k} {v:g}" for k, v in r.figures.items())
    return (f"  {trial.concurrency:>5} streams  p95 {r.p95_ms:8.1f} ms (budget {r.budget_ms:g})  "
            f"late {r.late_ratio:6.2%}  {'ok' if trial.ok else 'MISSES REAL TIME'}  {figures}")


def run(engine: CalibratedEngine, max_concurrency: int = DEFAULT_MAX_CONCURRENCY, seconds: float = 2.0) -> Calibration:
    started = time.monotonic()
    result = asyncio.run(calibrate(engine, max_concurrency, seconds))
    for trial in result.trials:
        print(describe(trial))
    bound = "at least " if result.reached_max else ""
    print(f"capacity: {bound}{result.capacity} streams in real time "
          f"(measured in {time.monotonic() - started:.0f}s, {seconds:g}s per step)")
    return result
