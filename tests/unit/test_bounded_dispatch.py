"""A run dispatches at most ``max_dispatched`` steps at once; the other ready steps wait in
its state and go, in the order they became ready, as those finish."""

from __future__ import annotations

from conveyor.contracts import RunFinished, RunStatus, StepStatus
from conveyor.service.run_state import MAX_DISPATCHED, RunState
from conveyor.service.scheduling import apply_event, cancel_run, start_run, top_up
from tests.unit.test_scheduling import NOW, fail, node, ok, ready_steps, spec


def fan(n: int, room: int) -> RunState:
    steps = [node("root"), *(node(f"w{i}", "root") for i in range(n))]
    steps.append(node("join", *(f"w{i}" for i in range(n)), fan_in=True))
    run = RunState.new("r", spec(*steps))
    run.max_dispatched = room
    return run


def test_a_fan_out_goes_out_a_few_at_a_time_and_completes() -> None:
    run = fan(5, room=2)
    assert ready_steps(start_run(run, NOW).emit) == [("root", 1)]
    out = apply_event(run, ok(run, "root"))
    assert ready_steps(out.emit) == [("w0", 1), ("w1", 1)]
    assert run.dispatched == 2 and list(run.ready) == ["w2", "w3", "w4"]
    # The undispatched steps stay pending, attempt 0, as the store records them.
    assert (run.steps["w4"].status, run.steps["w4"].attempt) == (StepStatus.PENDING, 0)
    sent = ["w0", "w1"]
    for name in ["w1", "w0", "w2", "w3"]:
        sent += [step for step, _ in ready_steps(apply_event(run, ok(run, name)).emit)]
        assert run.dispatched <= 2
    assert sent == ["w0", "w1", "w2", "w3", "w4"]
    out = apply_event(run, ok(run, "w4"))
    assert ready_steps(out.emit) == [("join", 1)]
    out = apply_event(run, ok(run, "join"))
    assert run.status is RunStatus.COMPLETED and run.dispatched == 0
    assert any(isinstance(e, RunFinished) for e in out.emit)


def test_a_failed_step_frees_its_room() -> None:
    run = fan(3, room=1)
    start_run(run, NOW)
    apply_event(run, ok(run, "root"))
    out = apply_event(run, fail(run, "w0", retryable=False))
    assert ready_steps(out.emit) == [("w1", 1)]
    assert run.steps["join"].status is StepStatus.SKIPPED


def test_a_retry_keeps_its_room() -> None:
    run = RunState.new("r", spec(node("root"), node("a", "root", retries=1), node("b", "root")))
    run.max_dispatched = 1
    start_run(run, NOW)
    apply_event(run, ok(run, "root"))
    out = apply_event(run, fail(run, "a"))
    assert ready_steps(out.emit) == [("a", 2)]  # b still waits
    assert list(run.ready) == ["b"]


def test_cancelling_a_run_cancels_the_steps_that_waited_for_room() -> None:
    run = fan(4, room=1)
    start_run(run, NOW)
    apply_event(run, ok(run, "root"))
    cancel_run(run, NOW, "stop")
    assert {s.status for s in run.steps.values()} == {StepStatus.COMPLETED, StepStatus.CANCELLED}
    assert ready_steps(apply_event(run, ok(run, "w0")).emit) == []
    assert top_up(run).emit == []


def test_a_reloaded_run_counts_the_same_and_tops_up_what_a_crash_left() -> None:
    pipeline = fan(4, room=2)
    start_run(pipeline, NOW)
    apply_event(pipeline, ok(pipeline, "root"))
    apply_event(pipeline, ok(pipeline, "w0"))
    reloaded = RunState.new("r", spec(*(s.spec for s in pipeline.steps.values())))
    reloaded.max_dispatched = 2
    reloaded.status = RunStatus.RUNNING
    for name, state in pipeline.steps.items():
        reloaded.steps[name].status, reloaded.steps[name].attempt = state.status, state.attempt
        reloaded.steps[name].outputs = state.outputs
    reloaded.recount()
    assert (reloaded.dispatched, list(reloaded.ready)) == (2, ["w3"])
    assert top_up(reloaded).emit == []  # the live run dispatched all it had room for
    reloaded.steps["w1"].status = StepStatus.COMPLETED  # as if its completion was stored alone
    reloaded.recount()
    assert ready_steps(top_up(reloaded).emit) == [("w3", 1)]


def test_the_default_room_sends_a_fan_out_of_a_thousand_at_once() -> None:
    assert MAX_DISPATCHED >= 1000
    run = fan(1000, room=MAX_DISPATCHED)
    start_run(run, NOW)
    assert len(ready_steps(apply_event(run, ok(run, "root")).emit)) == 1000


def test_a_deferring_run_decides_every_ready_step_and_dispatches_misses_within_its_room() -> None:
    from conveyor.service.scheduling import complete_from_cache, dispatch_ready

    run = fan(4, room=1)
    run.defer = True
    out = start_run(run, NOW)
    assert out.ready == ["root"] and not ready_steps(out.emit)
    assert ready_steps(dispatch_ready(run, "root", "k-root").emit) == [("root", 1)]
    out = apply_event(run, ok(run, "root"))
    # Deciding takes no room: a step that is reused never needs a worker.
    assert out.ready == ["w0", "w1", "w2", "w3"] and run.dispatched == 0
    root_outputs = run.steps["root"].outputs
    assert ready_steps(dispatch_ready(run, "w0", "k0").emit) == [("w0", 1)]
    assert not ready_steps(dispatch_ready(run, "w1", "k1").emit)  # no room: it waits
    assert run.steps["w1"].status is StepStatus.PENDING and run.dispatched == 1
    reused = complete_from_cache(run, "w2", dict(root_outputs), "old-run", "k2", NOW)
    assert run.steps["w2"].status is StepStatus.CACHED and not ready_steps(reused.emit)
    assert run.dispatched == 1
    # w0's end makes room for w1, decided before; w3 is still to be decided.
    out = apply_event(run, ok(run, "w0"))
    assert ready_steps(out.emit) == [("w1", 1)] and run.dispatched == 1
    assert ready_steps(dispatch_ready(run, "w3", "k3").emit) == []
    out = apply_event(run, ok(run, "w1"))
    assert ready_steps(out.emit) == [("w3", 1)]
    out = apply_event(run, ok(run, "w3"))
    assert out.ready == ["join"]
