"""Named crash points: fault tests make a process kill itself where a signal cannot aim.

``CONVEYOR_CRASH_AT=before-publish:StepReady:train`` kills the process (SIGKILL, no
cleanup) just before it publishes a batch holding a StepReady of step ``train`` (or one
that carries it as a sibling; likewise a ``StepsDone`` the outcomes it carries);
``after-publish:...`` just after the broker confirmed it. Unset, a crash point costs one
environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

from conveyor.contracts import Event, StepReady
from conveyor.contracts.events import StepsDone, step_of

CRASH_ENV = "CONVEYOR_CRASH_AT"


def _with_what_it_carries(event: Event) -> list[Event]:
    if isinstance(event, StepReady):
        return [event, *event.siblings]
    if isinstance(event, StepsDone):
        return [event, *event.outcomes]
    return [event]


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
        for part in _with_what_it_carries(event):
            if (not type_ or part.type == type_) and (not step or step_of(part) == step):
                os.kill(os.getpid(), signal.SIGKILL)
