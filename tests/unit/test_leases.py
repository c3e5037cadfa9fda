"""Leases of running attempts, called directly: a lapsed lease starts a new attempt."""

from __future__ import annotations

from datetime import timedelta

from conveyor.contracts import (
    AttemptsCancelled,
    RunStatus,
    StepHeartbeat,
    StepReady,
    StepStarted,
    StepStatus,
    WorkerFacts,
)
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import (
    apply_event,
    cancel_run,
    expire_leases,
    extend_leases,
    grant_leases,
    renew_lease,
    start_run,
)
from tests.unit.test_scheduling import BY, NOW, fail, node, ok, ready_steps, spec

LEASE = timedelta(seconds=30)


def running(*steps: str, retries: int = 0) -> RunState:
    """A run of ``a -> b`` (or the given steps) whose first step runs on worker ``w``."""
    names = steps or ("a", "b")
    nodes = [node(names[0], retries=retries)] + [
        node(n, names[i], retries=retries) for i, n in enumerate(names[1:])
    ]
    run = RunState.new("r", spec(*nodes))
    start_run(run, NOW)
    apply_event(run, StepStarted(run_id="r", step=names[0], attempt=1, by=BY))
    renew_lease(run, names[0], 1, NOW + LEASE)
    return run


def test_a_lease_renewed_by_heartbeats_does_not_lapse() -> None:
    run = running()
    beat = StepHeartbeat(run_id="r", step="a", attempt=1, by=BY)
    assert apply_event(run, beat).steps == []
    renew_lease(run, "a", 1, NOW + 2 * LEASE)
    assert expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3).steps == []


def test_a_lapsed_lease_starts_the_next_attempt_and_stops_the_old_one() -> None:
    run = running()
    out = expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3)
    assert ready_steps(out.emit) == [("a", 2)]
    stop = [e for e in out.emit if isinstance(e, AttemptsCancelled)]
    assert stop and stop[0].attempts == {"a": 1} and "w stopped renewing" in stop[0].reason
    assert run.steps["a"].status is StepStatus.PENDING and run.steps["a"].attempt == 2


def test_a_late_outcome_of_the_lapsed_attempt_changes_nothing() -> None:
    run = running()
    expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3)
    assert apply_event(run, fail(run, "a", attempt=1)).steps == []
    assert apply_event(run, ok(run, "a", attempt=1)).steps == []
    assert run.steps["a"].status is StepStatus.PENDING
    done = apply_event(run, ok(run, "a", attempt=2))
    assert ready_steps(done.emit) == [("b", 1)]


def test_a_step_whose_attempts_keep_getting_lost_fails_and_the_run_goes_on() -> None:
    run = running()
    now = NOW
    for attempt in (1, 2):
        now += LEASE + timedelta(seconds=1)
        expire_leases(run, now, max_lost=3)
        apply_event(run, StepStarted(run_id="r", step="a", attempt=attempt + 1, by=BY))
        renew_lease(run, "a", attempt + 1, now + LEASE)
    out = expire_leases(run, now + LEASE + timedelta(seconds=1), max_lost=3)
    assert ready_steps(out.emit) == []
    assert run.steps["a"].status is StepStatus.FAILED
    assert run.steps["b"].status is StepStatus.SKIPPED
    assert out.run_status is RunStatus.FAILED
    assert "lost 3 times" in (out.steps[0].error or "")


def test_lost_attempts_do_not_use_the_steps_retries() -> None:
    run = running(retries=1)
    expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3)
    out = apply_event(run, fail(run, "a", attempt=2))
    assert ready_steps(out.emit) == [("a", 3)]


def test_a_pending_attempt_has_no_lease_and_a_heartbeat_marks_it_running() -> None:
    run = RunState.new("r", spec(node("a")))
    start_run(run, NOW)
    assert expire_leases(run, NOW + 10 * LEASE, max_lost=3).steps == []
    out = apply_event(run, StepHeartbeat(run_id="r", step="a", attempt=1, by=BY))
    assert out.steps[0].status is StepStatus.RUNNING


def test_a_restarted_controller_grants_fresh_leases_and_a_stalled_one_extends_them() -> None:
    run = running()
    run.steps["a"].lease_until = None
    grant_leases(run, NOW + LEASE)
    assert expire_leases(run, NOW + LEASE - timedelta(seconds=1), max_lost=3).steps == []
    extend_leases(run, timedelta(minutes=5))
    assert expire_leases(run, NOW + 5 * LEASE, max_lost=3).steps == []


def test_heartbeats_of_another_worker_for_a_stale_attempt_renew_nothing() -> None:
    run = running()
    expire_leases(run, NOW + LEASE + timedelta(seconds=1), max_lost=3)
    other = WorkerFacts(worker="x", pid=2)
    apply_event(run, StepStarted(run_id="r", step="a", attempt=2, by=other))
    renew_lease(run, "a", 1, NOW + 100 * LEASE)  # the old attempt's heartbeat
    renew_lease(run, "a", 2, NOW + 2 * LEASE)
    out = expire_leases(run, NOW + 3 * LEASE, max_lost=3)
    assert ready_steps(out.emit) == [("a", 3)] and "x stopped" in (out.steps[0].error or "")


def test_cancelling_a_run_tells_the_workers_to_stop_its_attempts() -> None:
    run = running()
    out = cancel_run(run, NOW, "user asked")
    stop = [e for e in out.emit if isinstance(e, AttemptsCancelled)]
    assert len(stop) == 1 and stop[0].attempts == {} and stop[0].reason == "user asked"
    assert not [e for e in out.emit if isinstance(e, StepReady)]
