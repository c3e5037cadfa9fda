"""What one controller batch changes, gathered before the one transaction that records it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from conveyor.contracts import Event, PipelineSpec, RunRequested
from conveyor.service.run_state import Transition


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

    def change(self, run_id: str, transition: Transition) -> None:
        if run_id in self.changes:
            self.changes[run_id].extend(transition)
        else:
            self.changes[run_id] = transition

    @property
    def events(self) -> list[Event]:
        return [e for t in self.changes.values() for e in t.emit]
