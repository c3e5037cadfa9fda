"""What one controller batch changes, gathered before the one transaction that records it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from conveyor.contracts import Event, PipelineSpec, RunRequested, StepReady
from conveyor.contracts.events import bundled
from conveyor.service.run_state import Transition

SPREAD = 8
"""A run's steps dispatched in one batch go out in at least this many messages per pool
(or one each): enough for as many workers to start at once. Steps beyond it travel as
siblings (``StepReady.siblings``), a fan-out's branches a dozen to a message."""


@dataclass
class Batch:
    """The runs a batch starts and the transitions of the runs it changes."""

    now: datetime
    new_runs: list[tuple[RunRequested, PipelineSpec, str | None]] = field(default_factory=list)
    changes: dict[str, Transition] = field(default_factory=dict)
    cancels: dict[str, str] = field(default_factory=dict)
    """The runs this batch asks to cancel, with the reason."""
    withdrawn: set[str] = field(default_factory=set)
    """Runs requested and cancelled in this batch: recorded cancelled, never started."""
    recorded: set[str] = field(default_factory=set)
    """Runs requested in this batch that the store holds already (requests redelivered)."""
    queued: list[RunRequested] = field(default_factory=list)
    """Requests that came in this batch and wait in the run queue: recorded queued."""

    def change(self, run_id: str, transition: Transition) -> None:
        if run_id in self.changes:
            self.changes[run_id].extend(transition)
        else:
            self.changes[run_id] = transition

    def events(self) -> list[Event]:
        """What the batch publishes: each run's events in order, its StepReady last,
        bundled (a step queue's order against other messages is no one's to rely on)."""
        events: list[Event] = []
        for change in self.changes.values():
            ready = [e for e in change.emit if isinstance(e, StepReady)]
            if len(ready) < 2 * SPREAD:
                events.extend(change.emit)
                continue
            events.extend(e for e in change.emit if not isinstance(e, StepReady))
            events.extend(bundled(ready, SPREAD))
        return events
