"""The outcomes of a step that rode, heard before the outcome of the step before it: held
unacked until that outcome is recorded, then taken as any other (see
``scheduling.early``). Only then can the controller tell whether the step read the
recorded outputs; applied at once, such an outcome would be taken on trust, or, for a
retry, need inputs the controller does not have yet. A controller that stops or crashes
leaves them unacked, and the broker delivers them again.

Each held delivery takes a place in the controller's prefetch, so only one outcome is held
per attempt (another copy's is acked: the one held decides, and a rider that read other
outputs runs again anyway), and a StepStarted or heartbeat is never held."""

from __future__ import annotations

from collections.abc import Mapping

from conveyor.contracts import RunStatus, StepFailed, StepSucceeded
from conveyor.service import scheduling
from conveyor.service.run_state import RunState
from conveyor.service.unreadable import Inbound


class EarlyEvents:
    """Held deliveries, by run, then by (step, attempt)."""

    def __init__(self) -> None:
        self._held: dict[str, dict[tuple[str, int], Inbound]] = {}

    def holds(self, delivery: Inbound) -> bool:
        """Hold ``delivery`` if it is an outcome and none of its attempt is held; False if
        it is not held (its batch acks it: dropped)."""
        event = delivery.event
        if not isinstance(event, StepSucceeded | StepFailed):
            return False
        held = self._held.setdefault(event.run_id, {})
        return held.setdefault((event.step, event.attempt), delivery) is delivery

    def due(self, states: Mapping[str, RunState]) -> list[Inbound]:
        """The held deliveries that are no longer early, their runs' states in ``states``
        (a run not there ended, or is to be loaded again: each of its deliveries is taken
        again, and held again if it still is early)."""
        going: list[Inbound] = []
        for run_id, held in list(self._held.items()):
            state = states.get(run_id)
            for attempt, delivery in list(held.items()):
                if (
                    state is not None
                    and state.status is RunStatus.RUNNING
                    and scheduling.early(state, delivery.event)
                ):
                    continue
                going.append(held.pop(attempt))
            if not held:
                del self._held[run_id]
        return going

    def release_all(self) -> list[Inbound]:
        """Every held delivery (the controller stops: they go back to the broker)."""
        held = [d for run in self._held.values() for d in run.values()]
        self._held.clear()
        return held
