"""The state machine's side of caching: steps that wait for the controller's decision,
completed from reused outputs or dispatched. Called directly: no broker, no store."""

from __future__ import annotations

from conveyor.contracts import RunFinished, RunStatus, StepStatus, StepStatusChanged
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import (
    apply_event,
    cancel_run,
    complete_from_cache,
    dispatch_ready,
    start_run,
    undecided,
)
from tests.unit.test_scheduling import NOW, node, ok, ready_steps, ref, spec, statuses


def deferring(*steps: object) -> RunState:
    run = RunState.new("r", spec(*steps))  # type: ignore[arg-type]
    run.defer = True
    return run


def test_ready_steps_wait_for_a_decision_instead_of_a_worker() -> None:
    run = deferring(node("a"), node("b", "a"))
    started = start_run(run, NOW)
    assert started.ready == ["a"] and ready_steps(started.emit) == []
    assert undecided(run) == ["a"]
    dispatched = dispatch_ready(run, "a", "k1")
    assert ready_steps(dispatched.emit) == [("a", 1)]
    assert dispatched.steps[0].cache_key == "k1" and run.steps["a"].cache_key == "k1"
    assert undecided(run) == [] and dispatch_ready(run, "a", "k1").steps == []
    # Its success readies b, which waits for a decision in turn.
    assert apply_event(run, ok(run, "a"), now=NOW).ready == ["b"]


def test_a_cached_step_counts_as_a_success_downstream_and_for_the_run() -> None:
    run = deferring(node("a"), node("b", "a"), node("c", "a", "b", fan_in=True))
    start_run(run, NOW)
    cached = complete_from_cache(run, "a", {"output": ref("a")}, "old-run", "k", NOW)
    assert statuses(run)["a"] is StepStatus.CACHED
    (update,) = cached.steps
    assert (update.attempt, update.duration_s, update.cached_from) == (0, 0.0, "old-run")
    (changed,) = [e for e in cached.emit if isinstance(e, StepStatusChanged)]
    assert changed.status is StepStatus.CACHED and changed.cached_from == "old-run"
    assert cached.ready == ["b"]
    b = complete_from_cache(run, "b", {"output": ref("b")}, "old-run", "k2", NOW)
    assert b.ready == ["c"] and run.waiting["c"] == 0
    dispatch_ready(run, "c", None)
    done = apply_event(run, ok(run, "c"), now=NOW)
    assert done.run_status is RunStatus.COMPLETED
    assert any(isinstance(e, RunFinished) for e in done.emit)
    # Counters rebuilt from the statuses (a reload) agree.
    before = dict(run.waiting)
    run.recount()
    assert run.waiting == before and run.unfinished == 0


def test_a_run_of_cached_steps_only_completes() -> None:
    run = deferring(node("a"))
    start_run(run, NOW)
    out = complete_from_cache(run, "a", {"output": ref("a")}, "old", "k", NOW)
    assert out.run_status is RunStatus.COMPLETED and run.status is RunStatus.COMPLETED


def test_late_or_wrong_decisions_change_nothing() -> None:
    run = deferring(node("a"), node("b", "a"))
    start_run(run, NOW)
    # b's inputs do not exist yet; outputs of other names are not this step's.
    assert complete_from_cache(run, "b", {"output": ref("b")}, "old", "k", NOW).steps == []
    assert complete_from_cache(run, "a", {"other": ref("a")}, "old", "k", NOW).steps == []
    assert dispatch_ready(run, "b", None).steps == []
    cancel_run(run, NOW, "stop")
    assert statuses(run)["a"] is StepStatus.CANCELLED
    assert complete_from_cache(run, "a", {"output": ref("a")}, "old", "k", NOW).steps == []
    assert dispatch_ready(run, "a", None).emit == []


def test_a_run_that_does_not_defer_dispatches_at_once() -> None:
    run = RunState.new("r", spec(node("a")))
    started = start_run(run, NOW)
    assert started.ready == [] and ready_steps(started.emit) == [("a", 1)]
    assert undecided(run) == []


def test_a_step_ready_leaves_out_what_only_the_controller_reads() -> None:
    step = node("a").model_copy(update={"code_digest": "sha256:" + "0" * 64, "cache": False})
    run = RunState.new("r", spec(step))
    (ready,) = start_run(run, NOW).emit
    wire = ready.model_dump(mode="json")["step"]  # type: ignore[union-attr]
    assert "code_digest" not in wire and "cache" not in wire
    assert run.steps["a"].spec.code_digest is not None  # the state keeps it for the key
