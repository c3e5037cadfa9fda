"""Named crash points: fault tests make a process kill itself where a signal cannot aim.

``CONVEYOR_CRASH_AT=before-publish:StepReady:train`` kills the process (SIGKILL, no
cleanup) just before it publishes a batch holding a StepReady of step ``train`` (or one
that carries it as a sibling);
``after-publish:...`` just after the broker confirmed it. Unset, a crash point costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from conveyor.contracts import Event, StepReady

CRASH_ENV = "CONVEYOR_CRASH_AT"


def _step_of(event: Event) -> str | None:
    if isinstance(event, StepReady):
        return event.step.name
    step = getattr(event, "step", None)
    return step if isinstance(step, str) else None


def crash_point(point: str, events: Sequence[Event]) -> None:
    """SIGKILL this process if $CONVEYOR_CRASH_AT names ``point`` and matches ``events``."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, what = wanted.partition(":")
    if name != point:
        return
    type_, _, step = what.partition(":")
    for event in events:
        parts = [event, *event.siblings] if isinstance(event, StepReady) else [event]
        for part in parts:
            if (not type_ or part.type == type_) and (not step or _step_of(part) == step):
                os.kill(os.getpid(), signal.SIGKILL)
