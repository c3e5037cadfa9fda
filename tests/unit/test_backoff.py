"""The backoff arithmetic: doubling from the first pause up to the cap, jitter within half."""

from __future__ import annotations

import random

from conveyor.workers.backoff import Backoff, backoff_interval, with_jitter


def test_the_interval_doubles_up_to_its_cap_and_stays_there() -> None:
    intervals = [backoff_interval(attempt, 0.5, 30.0) for attempt in range(1, 10)]
    assert intervals == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_interval(10_000, 0.5, 30.0) == 30.0


def test_jitter_shortens_by_at_most_half() -> None:
    rng = random.Random(7)
    draws = [with_jitter(10.0, rng) for _ in range(1000)]
    assert all(5.0 <= d <= 10.0 for d in draws)
    assert max(draws) - min(draws) > 4.0  # spread, not a constant


def test_backoff_counts_attempts_and_starts_over_on_reset() -> None:
    backoff = Backoff(1.0, 4.0)
    pauses = [backoff.failed() for _ in range(5)]
    assert backoff.attempt == 5
    for pause, interval in zip(pauses, [1.0, 2.0, 4.0, 4.0, 4.0], strict=True):
        assert interval / 2 <= pause <= interval
    backoff.reset()
    assert backoff.attempt == 0 and backoff.failed() <= 1.0
