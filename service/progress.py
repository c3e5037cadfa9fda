"""How often followers hear of step status changes: at most one RunProgress per interval.

The controller records status changes batch by batch, and on a busy stack a batch holds a
handful of events: one status message per batch would cost the broker, the controller and
every follower about as much as the work itself. So changes are held and released
together every ``every_s`` seconds, or at once when their run finishes (before its
RunFinished, so that a follower has seen every change when it hears the run ended).
After a quiet spell, the first change goes out at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.contracts import Event, RunFinished, StepStatusChanged, progress_of

PROGRESS_EVERY_S = 0.2


class ProgressBuffer:
    """Status changes waiting to be published; ``now`` is any monotonic clock in seconds."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s = every_s
        self.due = float("-inf")
        self._held: list[StepStatusChanged] = []

    @property
    def pending(self) -> bool:
        return bool(self._held)

    def outgoing(self, events: Sequence[Event], now: float) -> list[Event]:
        """What to publish now of ``events`` and of the changes held so far."""
        rest: list[Event] = []
        for event in events:
            if isinstance(event, StepStatusChanged):
                self._held.append(event)
            else:
                rest.append(event)
        if now >= self.due:
            return self.release_all(now) + rest
        finished = {e.run_id for e in rest if isinstance(e, RunFinished)}
        if not finished:  # most batches: nothing held is due, nothing to scan
            return progress_of(rest)
        released = [c for c in self._held if c.run_id in finished]
        if released:
            self._held = [c for c in self._held if c.run_id not in finished]
        return progress_of([*released, *rest])

    def release_all(self, now: float) -> list[Event]:
        """Every held change, folded into one RunProgress per run; the next are due later."""
        held, self._held = self._held, []
        if held:
            self.due = now + self.every_s
        return progress_of(held)
