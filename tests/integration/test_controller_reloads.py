"""A controller that drops its run states and reloads them from the store (after a failed
batch, such as a "database is locked" hiccup, or at a restart) still knows which attempts
of a step were not its own failures: those lost with their worker, and those of a rider
run again on the recorded inputs. The controller itself (not started: its batches and
timers are called directly), on the embedded stack's store, with a broker of its own that
nothing consumes. Deliveries are fakes that remember how they were settled."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from conveyor.contracts import RunRequested, StepStarted, StepStatus, new_id, utcnow
from conveyor.service.controller import Controller
from conveyor.service.run_timers import LEASE_S
from tests.integration.controller_support import Fake, controller, started
from tests.unit.test_scheduling import BY, fail, node, ok, ref, spec


def status_of(c: Controller, run_id: str, step: str) -> StepStatus:
    """What the controller holds of ``step`` (a run it dropped once finished: failed)."""
    run = c._states.get(run_id)
    return run.steps[step].status if run is not None else StepStatus.FAILED


async def test_a_rider_run_again_keeps_its_retries_after_the_controller_reloads() -> None:
    # s1 may be retried once. Its first outcome read another execution's outputs of s0:
    # not taken, it runs again as attempt 2 ("uses none of its retries"). Then a batch
    # fails (any store hiccup: the controller drops its states and reloads them; or it
    # restarts), and attempt 2 fails, retryable. Reloaded, ``redone`` is 0: the attempt
    # is counted as s1's second failure, and s1 fails for good with its retry unused.
    async with controller() as c:
        run_id = await started(c, retries=1)
        state = c._states[run_id]
        await c._process([Fake(ok(state, "s0"))])  # type: ignore[list-item]
        other = {"rode_on": {"output": ref("another execution of s0").digest}}
        stale = ok(state, "s1").model_copy(update=other)
        await c._process([Fake(stale)])  # type: ignore[list-item]
        assert c._states[run_id].steps["s1"].attempt == 2
        c._forget_states()  # as after a failed batch, or a restart
        state = await c._state_of(run_id)
        assert state is not None
        await c._process([Fake(fail(state, "s1", attempt=2))])  # type: ignore[list-item]
        s1 = c._states[run_id].steps["s1"] if run_id in c._states else None
        status = s1.status if s1 is not None else StepStatus.FAILED
    assert status is StepStatus.PENDING, "s1's one retry was used up by its ride again"


async def test_a_step_whose_attempt_was_lost_keeps_its_retries_after_the_controller_reloads() -> (
    None
):
    # ``a`` may be retried once. Its worker stops renewing attempt 1's lease: attempt 2
    # starts, using none of its retries. The controller reloads its states, then attempt
    # 2 fails, retryable: it is ``a``'s first failure, and ``a`` is tried again.
    async with controller() as c:
        request = RunRequested(run_id=new_id(), pipeline="p", spec=spec(node("a", retries=1)))
        run_id = request.run_id
        await c._process([Fake(request)])  # type: ignore[list-item]
        begun = StepStarted(run_id=run_id, step="a", attempt=1, by=BY)
        await c._process([Fake(begun)])  # type: ignore[list-item]
        lapsed = utcnow() - timedelta(seconds=2 * LEASE_S)
        c._timers.renew(c._states[run_id], "a", 1, lapsed)
        c._timers.start(asyncio.get_running_loop().time() - LEASE_S / 4)  # a check due now
        await c._timers.check_leases()
        assert c._states[run_id].steps["a"].attempt == 2, "attempt 1 lost"
        c._forget_states()  # as after a failed batch, or a restart
        state = await c._state_of(run_id)
        assert state is not None
        await c._process([Fake(fail(state, "a", attempt=2))])  # type: ignore[list-item]
        assert status_of(c, run_id, "a") is StepStatus.PENDING, "its one retry is left"
        assert c._states[run_id].steps["a"].attempt == 3
