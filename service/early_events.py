"""The events of a step that rode, heard before the outcome of the step before it: held
unacked until that outcome is recorded, then taken as any other (see
``scheduling.early``). Only then can the controller tell whether the step read the
recorded outputs; applied at once, such an event would be taken on trust, or, for a retry,
need inputs the controller does not have yet. A controller that stops or crashes leaves
them unacked, and the broker delivers them again."""

from __future__ import annotations

from collections.abc import Mapping

from conveyor.contracts import RunStatus
from conveyor.service import scheduling
from conveyor.service.scheduling import RunState
from conveyor.service.unreadable import Inbound


class EarlyEvents:
    """Held deliveries, by run."""

    def __init__(self) -> None:
        self._held: dict[str, list[Inbound]] = {}

    def hold(self, delivery: Inbound) -> None:
        self._held.setdefault(delivery.event.run_id, []).append(delivery)

    def due(self, states: Mapping[str, RunState]) -> list[Inbound]:
        """The held deliveries that are no longer early, their runs' states in ``states``
        (a run not there ended, or is to be loaded again: each of its deliveries is taken
        again, and held again if it still is early)."""
        if not self._held:
            return []
        going: list[Inbound] = []
        for run_id, held in list(self._held.items()):
            state = states.get(run_id)
            if state is None or state.status is not RunStatus.RUNNING:
                waiting = []
            else:
                waiting = [d for d in held if scheduling.early(state, d.event)]
            going += [d for d in held if all(d is not w for w in waiting)]
            if waiting:
                self._held[run_id] = waiting
            else:
                del self._held[run_id]
        return going

    def release_all(self) -> list[Inbound]:
        """Every held delivery (the controller stops: they go back to the broker)."""
        held = [d for run in self._held.values() for d in run]
        self._held.clear()
        return held
