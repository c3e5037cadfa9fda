"""How often one client address may get the token wrong at ``/login``.

Each address has ``attempts`` failures per ``window_s`` seconds; past that, every login from
it (even with the right token, so a guesser learns nothing) waits until its oldest failure
is ``window_s`` old. Only failures count, so a user who logs in is never held up by it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

LOGIN_ATTEMPTS = 10
LOGIN_WINDOW_S = 60.0
MAX_ADDRESSES = 10_000
"""Addresses remembered at most (the least recently failing are forgotten first)."""


class LoginAttempts:
    """Failed logins per client address in a sliding window. Not thread-safe: one loop."""

    def __init__(
        self,
        attempts: int = LOGIN_ATTEMPTS,
        window_s: float = LOGIN_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self._clock = clock
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures

    def wait_s(self, address: str) -> int:
        """Seconds ``address`` must wait before it may try again (0: it may now)."""
        now = self._clock()
        failures = self._recent(address, now)
        if len(failures) < self.attempts:
            return 0
        return max(1, math.ceil(failures[0] + self.window_s - now))

    def failed(self, address: str) -> None:
        """Count a wrong token from ``address``."""
        now = self._clock()
        failures = self._recent(address, now)
        failures.append(now)
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
