"""Deciding each step that became ready in a batch: complete it from outputs found for its
cache key, let it wait for an identical step in flight, or dispatch it.

The controller hands every batch here before recording it; what is decided is added to the
batch's transitions, so that it is recorded in the same transaction.
"""

from __future__ import annotations

from conveyor.contracts import FINISHED_STEP_STATUSES, StepStatus
from conveyor.service import scheduling
from conveyor.service.batches import Batch
from conveyor.service.cache_keys import cache_key
from conveyor.service.in_flight import InFlight, StepId
from conveyor.service.run_state import RunState, StepUpdate, Transition
from conveyor.service.step_reuse import StepReuse, Wanted


class StepDecisions:
    """The decisions about ready steps of the runs in ``states`` (the controller's, shared),
    and the bookkeeping of identical steps in flight that they need."""

    def __init__(self, reuse: StepReuse, states: dict[str, RunState]) -> None:
        self._reuse = reuse
        self._states = states
        self._in_flight = InFlight()

    def rebuild(self, batch: Batch) -> None:
        """Rebuild which keys are in flight from the runs, and add to ``batch`` each step
        that waits for a decision: one that was never recorded, or a wait for an identical
        step in flight, which the rebuilt bookkeeping no longer holds."""
        self._in_flight = InFlight()
        for run_id, state in self._states.items():
            for name, step in state.steps.items():
                going = step.status in (StepStatus.PENDING, StepStatus.RUNNING)
                if going and step.attempt > 0 and step.cache_key and step.spec.cache:
                    self._in_flight.claim(step.cache_key, (run_id, name))
            batch.change(run_id, Transition(ready=scheduling.undecided(state)))

    async def decide(self, batch: Batch) -> None:
        """Decide each step that became ready in ``batch``. A step completed from reused
        outputs makes its children ready in turn, decided in the next round."""
        scanned: dict[str, int] = {}
        while True:
            ready: list[StepId] = []
            for run_id, change in list(batch.changes.items()):
                end = len(change.steps)
                for update in change.steps[scanned.get(run_id, 0) : end]:
                    if update.status in FINISHED_STEP_STATUSES:
                        ready.extend(self._settle(batch, run_id, update))
                scanned[run_id] = end
                ready.extend((run_id, name) for name in change.ready)
                change.ready.clear()
            if not ready:
                return
            await self._resolve(batch, ready)

    def _settle(self, batch: Batch, run_id: str, update: StepUpdate) -> list[StepId]:
        """A step finished: the steps that waited for its key are completed from its
        outputs if it succeeded; else returned, to be decided again."""
        settled = self._in_flight.finish((run_id, update.name))
        if settled is None:
            return []
        key, waiters = settled
        if update.status is not StepStatus.COMPLETED:
            return waiters
        for waiter_run, name in waiters:
            state = self._states.get(waiter_run)
            if state is not None:
                change = scheduling.complete_from_cache(
                    state, name, update.outputs, run_id, key, batch.now
                )
                batch.change(waiter_run, change)
        return []

    async def _resolve(self, batch: Batch, ready: list[StepId]) -> None:
        wanted: list[Wanted] = []
        found: list[tuple[StepId, RunState]] = []
        for run_id, name in ready:
            state = self._states.get(run_id)
            if state is None or name not in state.steps:
                continue
            spec = state.steps[name].spec
            key = cache_key(spec, scheduling.inputs_of(state, spec))
            previous = None
            if name in state.previous and state.retry_of is not None:
                old_key, origin = state.previous[name]
                if old_key is None or old_key == key:
                    previous = ((state.retry_of, name), origin)
            wanted.append(Wanted(key, tuple(spec.outputs), spec.cache, previous))
            found.append(((run_id, name), state))
        hits = await self._reuse.find(wanted)
        for ((run_id, name), state), want, hit in zip(found, wanted, hits, strict=True):
            if hit is not None:
                change = scheduling.complete_from_cache(
                    state, name, hit.outputs, hit.source, want.key, batch.now
                )
            elif want.key is not None and want.use_cache:
                if not self._in_flight.claim(want.key, (run_id, name)):
                    continue  # an identical step computes it: this one waits for it
                change = scheduling.dispatch_ready(state, name, want.key)
            else:
                change = scheduling.dispatch_ready(state, name, want.key)
            batch.change(run_id, change)
