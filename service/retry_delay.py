"""How long a failed step waits before its next attempt: pure arithmetic, no clock.

The controller (``scheduling``) adds the result to the time it recorded the failure, and
dispatches the attempt when that time comes; no worker waits meanwhile.
"""

from __future__ import annotations

from conveyor.contracts import RetryPolicy


def retry_delay(
    policy: RetryPolicy | None, retry: int, *, asked_s: float | None = None, draw: float = 1.0
) -> float:
    """Seconds before retry number ``retry`` (1 for the first) of a step with ``policy``.

    ``asked_s`` is the wait the step itself asked for (``conveyor.Retry(after=...)``): it
    replaces the policy's, without jitter. Otherwise retry ``n`` waits
    ``delay_s * backoff ** (n - 1)``; with jitter, ``draw`` (a random number in [0, 1))
    shortens that to between half and all of it ("equal jitter": never less than half the
    planned wait, never more). Every wait is at most ``max_delay_s``.
    """
    policy = policy or RetryPolicy()
    if asked_s is not None:
        return min(asked_s, policy.max_delay_s)
    try:
        planned = policy.delay_s * policy.backoff ** max(retry - 1, 0)
    except OverflowError:  # a huge backoff ** retry is past any cap
        planned = policy.max_delay_s
    planned = min(planned, policy.max_delay_s)
    if policy.jitter:
        planned *= 0.5 + 0.5 * draw
    return planned
