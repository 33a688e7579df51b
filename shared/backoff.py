"""Capped exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff_delays(base_s: float = 0.25, cap_s: float = 10.0, rng: random.Random | None = None) -> Iterator[float]:
    """Endless delays: attempt n waits uniformly in [0, min(cap, base * 2**n)], never below base/4."""
    rand = rng or random.Random()
    attempt = 0
    while True:
        ceiling = min(cap_s, base_s * (2**attempt))
        yield max(base_s / 4, rand.uniform(0, ceiling))
        attempt = min(attempt + 1, 30)
