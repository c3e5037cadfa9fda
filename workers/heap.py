"""The garbage collector's settings for Conveyor's long-running processes.

A controller, worker or server process holds some 64,000 objects from its imports and its
start that live as long as it does, and each step it handles allocates a few hundred
short-lived containers. With CPython's defaults, the young generation is collected every
700 allocations (a few steps), and each full collection walks every object of the process
again: on a busy controller, full collections paused it for 30 to 60 ms at a time.

So, once started, these processes move what they hold to the permanent generation
(``gc.freeze``: never walked again) and collect the young generation less often. Only
process entry points call this: an application that embeds ``Conveyor`` keeps its own
settings (the collector is the whole process's).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (CPython: 700)."""


def settle_after_start() -> None:
    """Freeze what start-up made and collect less often; call once the process started."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
