"""The controller's timers without a controller: a waiting retry is dispatched when due, even
after a failed batch cleared the states; a lapsed lease starts a new attempt, unless the
controller itself was stalled, which extends every lease instead."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from conveyor.contracts import (
    PipelineSpec,
    RetryPolicy,
    StepFailed,
    StepReady,
    StepSpec,
    StepStarted,
    WorkerFacts,
    utcnow,
)
from conveyor.service.batches import Batch
from conveyor.service.run_state import RunState
from conveyor.service.run_timers import RunTimers
from conveyor.service.scheduling import apply_event, start_run

BY = WorkerFacts(worker="w", pid=1)


class Rig:
    """``RunTimers`` over one run ``r`` of one step ``a``, whose stored state ``state_of``
    reloads into ``states`` as the controller does; ``commit`` keeps the batches."""

    def __init__(self, *, retry_s: float = 0.0, lease_s: float = 30.0) -> None:
        step = StepSpec(name="a", ref="m:a", retries=1, retry=RetryPolicy(delay_s=retry_s))
        self.run = RunState.new("r", PipelineSpec(name="p", steps=[step]))
        start_run(self.run, utcnow())
        self.states = {"r": self.run}
        self.committed: list[Batch] = []
        self.timers = RunTimers(
            self.states, commit=self._commit, state_of=self._state_of, lease_s=lease_s
        )

    async def _commit(self, batch: Batch) -> None:
        self.committed.append(batch)
        for run_id, change in batch.changes.items():
            self.timers.changed(run_id, change)

    async def _state_of(self, run_id: str) -> RunState | None:
        self.states[run_id] = self.run
        return self.run

    def ready(self) -> list[tuple[str, int]]:
        return [
            (e.step.name, e.attempt)
            for batch in self.committed
            for e in batch.events()
            if isinstance(e, StepReady)
        ]


async def test_a_waiting_retry_is_dispatched_when_due_though_the_states_were_cleared() -> None:
    rig = Rig(retry_s=0.05)
    loop = asyncio.get_running_loop()
    rig.timers.start(loop.time())
    failed = StepFailed(run_id="r", step="a", attempt=1, error="E: x", retryable=True, by=BY)
    rig.timers.changed("r", apply_event(rig.run, failed, now=utcnow()))
    assert rig.timers.due(loop.time()) - loop.time() <= 0.05
    rig.states.clear()  # a failed batch: the run reloads only when something falls due
    await rig.timers.dispatch_retries()
    assert rig.committed == [], "not due yet"
    await asyncio.sleep(0.06)
    await rig.timers.dispatch_retries()
    assert rig.ready() == [("a", 2)]
    assert rig.timers.due(loop.time()) - loop.time() > 1, "nothing waits any more"


async def test_a_lapsed_lease_starts_a_new_attempt() -> None:
    rig = Rig(lease_s=1.0)
    apply_event(rig.run, StepStarted(run_id="r", step="a", attempt=1, by=BY))
    rig.timers.renew(rig.run, "a", 1, utcnow() - timedelta(seconds=2))
    loop = asyncio.get_running_loop()
    rig.timers.start(loop.time())
    await rig.timers.check_leases()
    assert rig.committed == [], "leases are checked a few times per lease, not at once"
    await asyncio.sleep(0.26)
    await rig.timers.check_leases()
    assert rig.ready() == [("a", 2)]


async def test_a_stalled_controller_extends_every_lease_instead_of_letting_them_lapse() -> None:
    rig = Rig(lease_s=1.0)
    apply_event(rig.run, StepStarted(run_id="r", step="a", attempt=1, by=BY))
    rig.timers.renew(rig.run, "a", 1, utcnow())
    rig.timers.start(asyncio.get_running_loop().time())
    await asyncio.sleep(1.1)  # the check was due after 0.25 s: late by more than half a lease
    await rig.timers.check_leases()
    assert rig.committed == []
    await asyncio.sleep(0.26)
    await rig.timers.check_leases()
    assert rig.committed == [], "the lease was extended by the stall"
