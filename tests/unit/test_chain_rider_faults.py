"""Chain riders when things go wrong: scenarios in which a rider could be stuck, lose its
retries, or have its outcome taken from inputs that are not its parent's recorded outputs.
Called directly: the state machine, no broker (tests/unit/test_chain_riders.py has the
helpers)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from conveyor.contracts import (
    Event,
    RetryPolicy,
    RunStatus,
    StepReady,
    StepStarted,
    StepStatus,
)
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import apply_event, expire_leases, renew_lease, start_run
from tests.unit.test_chain_riders import chain, link
from tests.unit.test_scheduling import BY, NOW, fail, ok, ref, spec

LEASE = timedelta(seconds=30)


def sent(events: list[Event]) -> set[tuple[str, int]]:
    """Every (step, attempt) these events hand to workers: dispatched, or riding."""
    found: set[tuple[str, int]] = set()
    for event in events:
        if isinstance(event, StepReady):
            found.add((event.step.name, event.attempt))
            found.update((r.step.name, r.attempt) for r in event.then)
    return found


def lapse(run: RunState, step: str) -> list[Event]:
    """``step``'s current attempt starts, then its worker goes silent past its lease."""
    attempt = run.steps[step].attempt
    apply_event(run, StepStarted(run_id=run.run_id, step=step, attempt=attempt, by=BY))
    renew_lease(run, step, attempt, NOW + LEASE)
    return expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3).emit


# --- 1. No room under max_dispatched: a step tried again leaves its riders behind --------


@pytest.mark.parametrize("how", ["retry", "lapsed-lease", "rode-again"])
def test_a_step_tried_again_in_a_full_run_still_sends_its_riders(how: str) -> None:
    # s0 -> s1 -> s2 and a root x, in a run whose room is full (3 here; a thousand steps
    # out in a real run): s0 and its riders take it all, x waits for room. A step tried
    # again must carry its riders, or the controller must dispatch them once it succeeds;
    # else a rider waits for ever (pending, at an attempt that nothing will ever send, and
    # that the workers were told to drop after a lapsed lease or a ride again).
    run = RunState.new(
        "r", spec(link("s0", retries=1), link("s1", "s0"), link("s2", "s1"), link("x"))
    )
    run.max_dispatched = 3
    start_run(run, NOW)
    assert run.steps["x"].attempt == 0  # no room
    events: list[Event] = []
    if how == "retry":
        events += apply_event(run, fail(run, "s0")).emit
        parent, rider = "s0", "s1"
    elif how == "lapsed-lease":
        events += lapse(run, "s0")
        parent, rider = "s0", "s1"
    else:
        apply_event(run, ok(run, "s0"))  # its room goes to x
        other = {"rode_on": {"output": ref("another execution of s0").digest}}
        events += apply_event(run, ok(run, "s1").model_copy(update=other)).emit
        parent, rider = "s1", "s2"
    assert run.steps[parent].attempt == 2
    events += apply_event(run, ok(run, parent, attempt=2)).emit
    state = run.steps[rider]
    assert state.status is StepStatus.PENDING
    assert (rider, state.attempt) in sent(events), "the rider is never sent: the run is stuck"


# --- 2. A rider's attempts must not count as its own failures ----------------------------


@pytest.mark.parametrize("how", ["parent-retried", "parent-lease-lapsed", "rode-again"])
def test_a_rider_keeps_its_retries_when_its_attempt_moved_on_without_it_failing(
    how: str,
) -> None:
    # s1 may be retried once. It rides again, with its attempt, when its parent is retried
    # or lost; it runs again, as a new attempt, when it read another execution's outputs.
    # Neither is a failure of its own: its one failure must still be retried.
    run = chain(2, retries=1)
    start_run(run, NOW)
    if how == "parent-retried":
        apply_event(run, fail(run, "s0"))
        apply_event(run, ok(run, "s0", attempt=2))
    elif how == "parent-lease-lapsed":
        lapse(run, "s0")
        apply_event(run, ok(run, "s0", attempt=2))
    else:
        apply_event(run, ok(run, "s0"))
        other = {"rode_on": {"output": ref("another execution of s0").digest}}
        apply_event(run, ok(run, "s1").model_copy(update=other))
    attempt = run.steps["s1"].attempt
    # Riding again with its parent's next attempt keeps its own; reading another
    # execution's outputs gives it a new one, which is not a failure of its own either.
    assert attempt == (2 if how == "rode-again" else 1)
    out = apply_event(run, fail(run, "s1", attempt=attempt))
    assert run.steps["s1"].status is StepStatus.PENDING, "its one retry was used up by others"
    assert ("s1", attempt + 1) in sent(out.emit)


# --- 3. A rider's events heard before its parent's outcome --------------------------------
# The controller hears a step's outcome before its rider's as long as it takes events in
# queue order. It does not always: a batch that fails (the broker did not confirm the
# controller's publishes, or the store did not answer) is handed back to the broker, while
# the deliveries already in the controller's inbox (prefetch 4096) are taken first.


def test_a_riders_outcome_heard_first_is_not_taken_from_another_executions_outputs() -> None:
    # s0's attempt 1 ran twice (its worker died after it forwarded s1, before its ack):
    # execution A made ref("s0"), execution B another output. B's rider is heard first,
    # then A's outcome is recorded for s0. s1's recorded outcome must be from an execution
    # that read ref("s0"); here it is taken from B's output, which nothing records.
    run = chain(2)
    start_run(run, NOW)
    b_output = ref("execution B of s0")
    b_rider = ok(run, "s1").model_copy(update={"rode_on": {"output": b_output.digest}})
    apply_event(run, b_rider)
    apply_event(run, ok(run, "s0"))  # execution A's outcome: ref("s0")
    apply_event(run, b_rider)  # its delivery again, had the controller handed it back
    recorded = run.steps["s0"].outputs["output"]
    assert recorded == ref("s0")
    if run.steps["s1"].status is StepStatus.COMPLETED:
        assert recorded.digest == b_output.digest, (
            "s1 completed from outputs of s0 that are not the recorded ones"
        )


def test_a_riders_retryable_failure_heard_before_its_parents_success_is_retried() -> None:
    # No duplicate needed: s1 failed (retryable) and its StepFailed overtook s0's
    # StepSucceeded. Dispatching s1 again needs s0's outputs, not recorded yet: KeyError,
    # the batch fails, and once taken apart the StepFailed is dead-lettered; an attempt of
    # s1 that was never announced (shorter than announce_after) then waits for ever.
    run = chain(2, retries=1)
    start_run(run, NOW)
    early = fail(run, "s1")
    events = apply_event(run, early).emit
    events += apply_event(run, ok(run, "s0")).emit
    events += apply_event(run, early).emit  # its delivery again, had it been handed back
    assert run.steps["s1"].status is StepStatus.PENDING
    assert ("s1", 2) in sent(events)
    apply_event(run, ok(run, "s1", attempt=2))
    assert run.status is RunStatus.COMPLETED


def test_a_riders_lease_lapsing_before_its_parents_outcome_is_checked_safely() -> None:
    # s1's StepStarted overtook s0's StepSucceeded, and s1's worker died. A lease check
    # that raises (KeyError: s0 has no outputs recorded) fails the check of every run of
    # the stack: the controller backs off and reloads, until s0's outcome is recorded.
    run = chain(2)
    start_run(run, NOW)
    lapse(run, "s1")  # raises KeyError: s0 has no outputs recorded
    assert run.steps["s1"].status is StepStatus.PENDING


# --- 4. A hostile (or buggy) rode_on on a step that did not ride -------------------------


@pytest.mark.parametrize("step", ["a", "c"], ids=["no-upstream", "join"])
def test_rode_on_on_a_step_that_cannot_ride_does_not_fail_the_batch(step: str) -> None:
    # ``rode_on`` comes from outside (any worker, or anything that can publish to the
    # events exchange). A step without exactly one upstream step cannot have ridden: its
    # outcome must not raise (a batch that raises is taken apart message by message, and
    # every other run's events of that batch wait for it).
    run = RunState.new("r", spec(link("a"), link("b"), link("c", "a", "b")))
    start_run(run, NOW)
    if step == "c":
        apply_event(run, ok(run, "a"))
        apply_event(run, ok(run, "b"))
    hostile = ok(run, step).model_copy(update={"rode_on": {"output": ref("x").digest}})
    apply_event(run, hostile)  # ValueError: not enough / too many values to unpack


# --- 5. A retry that waits leaves its riders current at their old attempts ---------------


def test_a_stale_forward_while_the_parents_retry_waits_is_not_taken() -> None:
    # s0's attempt 1 ran twice (its first worker lost the broker for a moment; the message
    # went to another worker): one execution failed (retryable, the retry waits 5 s), the
    # other succeeded and forwarded s1's attempt 1. Its success is stale (s0 is at attempt
    # 2, waiting), but s1's attempt 1 is still current: its outcome is taken although s0
    # has no outputs recorded, and s0's attempt 2 will record others.
    run = chain(2, retries=1)
    run.steps["s0"].spec = run.steps["s0"].spec.model_copy(
        update={"retry": RetryPolicy(delay_s=5.0, backoff=1.0)}
    )
    start_run(run, NOW)
    apply_event(run, fail(run, "s0"), now=NOW)  # the retry waits: no StepReady yet
    assert run.steps["s0"].attempt == 2 and run.steps["s0"].retry_at is not None
    stale = ok(run, "s0")
    assert apply_event(run, stale).steps == []  # fenced, as it should be
    forwarded_s1 = ok(run, "s1").model_copy(
        update={"rode_on": {"output": stale.outputs["output"].digest}}
    )
    apply_event(run, forwarded_s1)
    assert run.steps["s1"].status is not StepStatus.COMPLETED, (
        "s1 completed from a stale attempt of s0 whose outputs are not recorded"
    )
