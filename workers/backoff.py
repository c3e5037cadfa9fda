"""Capped exponential backoff with jitter, for whatever waits on a dependency that is down.

Pure arithmetic: the callers (the broker connection, the controller's store retries) do the
sleeping and the logging.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_interval(attempt: int, first_s: float, cap_s: float) -> float:
    """The pause after failed attempt number ``attempt`` (1, 2, ...): ``first_s`` doubled per
    attempt, never above ``cap_s``."""
    exponent = min(max(attempt - 1, 0), 64)  # 2**64 * anything is past any cap
    return min(cap_s, first_s * 2.0**exponent)


def with_jitter(interval: float, rng: random.Random | None = None) -> float:
    """``interval`` shortened by up to half at random, so that processes that lost the same
    dependency at the same moment do not all retry at the same moments ("equal jitter")."""
    draw = (rng or random).random()
    return interval * (0.5 + 0.5 * draw)


@dataclass
class Backoff:
    """The attempts made so far, and the pause before the next one."""

    first_s: float
    cap_s: float
    attempt: int = 0

    def failed(self) -> float:
        """Count one more failed attempt; the (jittered) pause before the next one."""
        self.attempt += 1
        return with_jitter(backoff_interval(self.attempt, self.first_s, self.cap_s))

    def reset(self) -> None:
        self.attempt = 0
