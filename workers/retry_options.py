"""``@step``'s retry options checked and turned into the ``RetryPolicy`` a step carries."""

from __future__ import annotations

import math

from conveyor.contracts import MAX_BACKOFF, MAX_RETRIES, MAX_RETRY_DELAY_S, RetryPolicy


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and 0 <= value <= MAX_RETRY_DELAY_S):
        raise ValueError(f"{name} must be 0 to {MAX_RETRY_DELAY_S:.0f} seconds, not {value!r}")
    return float(value)


def retry_policy(
    *, retries: int, retry_delay: float, backoff: float, max_retry_delay: float, jitter: bool
) -> RetryPolicy | None:
    """The policy of these options; None when they are the defaults (retry at once), which
    leaves the step's spec as it was before retry policies existed."""
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise ValueError(f"retries must be a whole number, not {type(retries).__name__}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be 0 to {MAX_RETRIES}, not {retries}")
    if isinstance(backoff, bool) or not isinstance(backoff, int | float):
        raise ValueError(f"backoff must be a number, not {type(backoff).__name__}")
    if not (math.isfinite(backoff) and 1 <= backoff <= MAX_BACKOFF):
        raise ValueError(f"backoff must be 1 to {MAX_BACKOFF:g}, not {backoff!r}")
    if not isinstance(jitter, bool):
        raise ValueError(f"jitter must be True or False, not {type(jitter).__name__}")
    policy = RetryPolicy(
        delay_s=_seconds("retry_delay", retry_delay),
        backoff=backoff,
        max_delay_s=_seconds("max_retry_delay", max_retry_delay),
        jitter=jitter,
    )
    return None if policy == RetryPolicy() else policy
