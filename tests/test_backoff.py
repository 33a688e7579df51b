"""Retry delays: capped exponential backoff with full jitter, never quite zero."""

from __future__ import annotations

import random
from itertools import islice

from shared.backoff import backoff_delays


class _Highest(random.Random):
    """Draws the top of every range: the ceilings themselves."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _Lowest(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    delays = list(islice(backoff_delays(base_s=0.25, cap_s=10.0, rng=_Highest()), 8))
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_delay_is_never_below_a_quarter_of_the_base() -> None:
    """A draw of zero would retry at once: a fleet of workers hammering a hub that just came back."""
    assert list(islice(backoff_delays(base_s=0.2, cap_s=5.0, rng=_Lowest()), 5)) == [0.05] * 5
    drawn = list(islice(backoff_delays(base_s=0.2, cap_s=5.0, rng=random.Random(7)), 500))
    assert min(drawn) >= 0.05 and max(drawn) <= 5.0
    assert max(drawn[20:]) > 2.5, "full jitter: late draws spread up to the cap"


def test_an_outage_of_any_length_keeps_the_delays_at_the_cap() -> None:
    """A worker retrying for hours draws thousands of delays; each stays a number within the cap."""
    delays = list(islice(backoff_delays(base_s=0.25, cap_s=10.0, rng=_Highest()), 5000))
    assert delays[-1] == 10.0 and max(delays) == 10.0
