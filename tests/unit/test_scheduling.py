"""The run state machine, called directly: no broker, no store."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from conveyor.contracts import (
    ArtifactRef,
    OutputSelector,
    PipelineSpec,
    RunFinished,
    RunStatus,
    StepFailed,
    StepReady,
    StepSpec,
    StepStarted,
    StepStatus,
    StepSucceeded,
    WorkerFacts,
)
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import apply_event, cancel_run, start_run

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BY = WorkerFacts(worker="w", pid=1)


def ref(name: str) -> ArtifactRef:
    digest = "blake3:" + hashlib.sha256(name.encode()).hexdigest()
    return ArtifactRef(
        uri=f"file:///a/{name}",
        digest=digest,
        size=1,
        materializer="json",
        data_type="builtins.int",
    )


def spec(*steps: StepSpec) -> PipelineSpec:
    return PipelineSpec(name="p", steps=list(steps))


def node(name: str, *upstream: str, retries: int = 0, fan_in: bool = False) -> StepSpec:
    if fan_in:
        inputs = {"xs": [OutputSelector(step=u, output="output") for u in upstream]}
    else:
        inputs = {f"in_{u}": OutputSelector(step=u, output="output") for u in upstream}
    return StepSpec(name=name, ref=f"m:{name}", inputs=inputs, outputs=["output"], retries=retries)


def ok(run: RunState, step: str, attempt: int = 1) -> StepSucceeded:
    return StepSucceeded(
        run_id=run.run_id,
        step=step,
        attempt=attempt,
        outputs={"output": ref(step)},
        duration_s=0.1,
        by=BY,
    )


def fail(run: RunState, step: str, attempt: int = 1, retryable: bool = True) -> StepFailed:
    return StepFailed(
        run_id=run.run_id,
        step=step,
        attempt=attempt,
        error="ValueError: x",
        retryable=retryable,
        by=BY,
    )


def ready_steps(events: list[object]) -> list[tuple[str, int]]:
    return [(e.step.name, e.attempt) for e in events if isinstance(e, StepReady)]


def statuses(run: RunState) -> dict[str, StepStatus]:
    return {name: s.status for name, s in run.steps.items()}


def test_start_dispatches_only_roots() -> None:
    run = RunState.new("r", spec(node("a"), node("b"), node("c", "a", "b")))
    out = start_run(run, NOW)
    assert out.run_status is RunStatus.RUNNING
    assert ready_steps(out.emit) == [("a", 1), ("b", 1)]
    assert [(u.name, u.attempt) for u in out.steps] == [("a", 1), ("b", 1)]


def test_step_waits_for_all_upstream_and_gets_their_outputs() -> None:
    run = RunState.new("r", spec(node("a"), node("b"), node("c", "a", "b")))
    start_run(run, NOW)
    assert ready_steps(apply_event(run, ok(run, "a")).emit) == []
    out = apply_event(run, ok(run, "b"))
    (ready,) = [e for e in out.emit if isinstance(e, StepReady)]
    assert ready.step.name == "c"
    assert ready.inputs == {"in_a": ref("a"), "in_b": ref("b")}


def test_fan_in_receives_a_list_in_order() -> None:
    run = RunState.new(
        "r", spec(node("w1"), node("w2"), node("w3"), node("join", "w1", "w2", "w3", fan_in=True))
    )
    start_run(run, NOW)
    for name in ("w3", "w1"):
        apply_event(run, ok(run, name))
    out = apply_event(run, ok(run, "w2"))
    (ready,) = [e for e in out.emit if isinstance(e, StepReady)]
    assert ready.inputs == {"xs": [ref("w1"), ref("w2"), ref("w3")]}


def test_run_completes_when_every_step_completed() -> None:
    run = RunState.new("r", spec(node("a"), node("b", "a")))
    start_run(run, NOW)
    apply_event(run, ok(run, "a"))
    out = apply_event(run, ok(run, "b"))
    assert out.run_status is RunStatus.COMPLETED
    assert any(isinstance(e, RunFinished) and e.status is RunStatus.COMPLETED for e in out.emit)


def test_failure_skips_downstream_transitively_but_not_other_branches() -> None:
    run = RunState.new("r", spec(node("a"), node("b", "a"), node("c", "b"), node("x")))
    start_run(run, NOW)
    out = apply_event(run, fail(run, "a"))
    assert statuses(run) == {
        "a": StepStatus.FAILED,
        "b": StepStatus.SKIPPED,
        "c": StepStatus.SKIPPED,
        "x": StepStatus.PENDING,
    }
    assert out.run_status is None  # x still runs
    out = apply_event(run, ok(run, "x"))
    assert statuses(run)["x"] is StepStatus.COMPLETED
    assert out.run_status is RunStatus.FAILED
    assert run.error == "step 'a' failed"


def test_retry_dispatches_next_attempt_until_retries_exhausted() -> None:
    run = RunState.new("r", spec(node("a", retries=2)))
    start_run(run, NOW)
    assert ready_steps(apply_event(run, fail(run, "a", 1)).emit) == [("a", 2)]
    assert ready_steps(apply_event(run, fail(run, "a", 2)).emit) == [("a", 3)]
    out = apply_event(run, fail(run, "a", 3))
    assert ready_steps(out.emit) == []
    assert run.steps["a"].status is StepStatus.FAILED
    assert run.steps["a"].attempt == 3
    assert out.run_status is RunStatus.FAILED


def test_non_retryable_failure_is_not_retried() -> None:
    run = RunState.new("r", spec(node("a", retries=5)))
    start_run(run, NOW)
    out = apply_event(run, fail(run, "a", 1, retryable=False))
    assert ready_steps(out.emit) == []
    assert out.run_status is RunStatus.FAILED


def test_duplicate_and_stale_events_change_nothing() -> None:
    run = RunState.new("r", spec(node("a", retries=1), node("b", "a")))
    start_run(run, NOW)
    apply_event(run, fail(run, "a", 1))  # attempt 2 is now current
    stale = apply_event(run, ok(run, "a", 1))
    assert stale.steps == [] and stale.emit == []
    first = apply_event(run, ok(run, "a", 2))
    assert ready_steps(first.emit) == [("b", 1)]
    duplicate = apply_event(run, ok(run, "a", 2))
    assert duplicate.steps == [] and duplicate.emit == []
    late_start = apply_event(run, StepStarted(run_id="r", step="a", attempt=2, by=BY))
    assert late_start.steps == []


def test_started_marks_running_with_the_worker() -> None:
    run = RunState.new("r", spec(node("a")))
    start_run(run, NOW)
    out = apply_event(run, StepStarted(run_id="r", step="a", attempt=1, by=BY))
    assert out.steps[0].status is StepStatus.RUNNING and out.steps[0].pid == 1


def test_cancel_stops_the_run_and_ignores_late_completions() -> None:
    run = RunState.new("r", spec(node("a"), node("b", "a")))
    start_run(run, NOW)
    out = cancel_run(run, NOW, "user asked")
    assert out.run_status is RunStatus.CANCELLED
    assert set(statuses(run).values()) == {StepStatus.CANCELLED}
    assert apply_event(run, ok(run, "a")).emit == []
    assert cancel_run(run, NOW, "again").emit == []


def test_events_of_unknown_steps_are_ignored() -> None:
    run = RunState.new("r", spec(node("a")))
    start_run(run, NOW)
    assert apply_event(run, ok(run, "nope")).steps == []


def test_counters_rebuilt_from_statuses_match_the_live_ones() -> None:
    pipeline_spec = spec(node("a"), node("b"), node("c", "a", "b"), node("d", "c"))
    live = RunState.new("r", pipeline_spec)
    start_run(live, NOW)
    apply_event(live, ok(live, "a"))
    reloaded = RunState.new("r", pipeline_spec)
    for name, state in live.steps.items():
        reloaded.steps[name].status = state.status
        reloaded.steps[name].attempt = state.attempt
    reloaded.recount()
    assert (reloaded.waiting, reloaded.unfinished) == (live.waiting, live.unfinished)
    assert live.waiting == {"a": 0, "b": 0, "c": 1, "d": 1} and live.unfinished == 3


def test_a_step_never_announced_gets_its_start_from_its_duration() -> None:
    run = RunState.new("r", spec(node("a"), node("b")))
    start_run(run, NOW)
    quiet = ok(run, "a")
    (update,) = apply_event(run, quiet).steps
    assert update.started is not None and quiet.duration_s == 0.1
    assert (quiet.time - update.started).total_seconds() == pytest.approx(0.1)
    apply_event(run, StepStarted(run_id="r", step="b", attempt=1, by=BY))
    (announced,) = apply_event(run, ok(run, "b")).steps
    assert announced.started is None, "the announced start is kept"


def test_a_new_run_counts_what_a_recount_of_it_derives() -> None:
    # A fan-in naming one upstream twice waits for it once.
    twice = node("twice", "a", "a", fan_in=True)
    run = RunState.new("r", spec(node("a"), node("b"), node("c", "a", "b"), twice))
    counted = (run.unfinished, dict(run.waiting), list(run.ready), run.dispatched)
    run.recount()
    assert counted == (run.unfinished, run.waiting, list(run.ready), run.dispatched)
    assert counted == (4, {"a": 0, "b": 0, "c": 2, "twice": 1}, ["a", "b"], 0)
