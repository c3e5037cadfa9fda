"""Steps that ride on the StepReady of the step before them in a chain (the cache off): the
controller dispatches them ahead, the worker that completes a step forwards its rider.
Called directly: the state machine, the contract and the forwarding, no broker."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from conveyor.contracts import (
    AttemptsCancelled,
    MalformedEvent,
    OutputSelector,
    RetryPolicy,
    RunStatus,
    StepReady,
    StepSpec,
    StepStarted,
    StepStatus,
    encode_event,
    parse_event,
)
from conveyor.contracts.events import MAX_RIDERS, forwarded
from conveyor.service.cache_keys import cache_key
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import (
    apply_event,
    dispatch_due_retries,
    early,
    expire_leases,
    renew_lease,
    start_run,
)
from tests.unit.test_scheduling import BY, NOW, fail, node, ok, ref, spec

DIGEST = "sha256:" + "ab" * 32


def link(name: str, *upstream: str, cache: bool = False, retries: int = 0) -> StepSpec:
    """A step of a run with the cache off (``cache``: a step the controller may reuse)."""
    step = node(name, *upstream, retries=retries)
    return step.model_copy(update={"cache": cache, "code_digest": DIGEST})


def chain(length: int, **kwargs: bool | int) -> RunState:
    names = [f"s{i}" for i in range(length)]
    steps = [link(names[0], **kwargs)]  # type: ignore[arg-type]
    steps += [link(n, names[i], **kwargs) for i, n in enumerate(names[1:])]  # type: ignore[arg-type]
    return RunState.new("r", spec(*steps))


def readies(events: list[object]) -> list[StepReady]:
    return [e for e in events if isinstance(e, StepReady)]


def riders(ready: StepReady) -> list[tuple[str, int]]:
    return [(r.step.name, r.attempt) for r in ready.then]


def test_a_chain_with_the_cache_off_rides_on_its_first_steps_ready() -> None:
    run = chain(4)
    out = start_run(run, NOW)
    (ready,) = readies(out.emit)
    assert ready.step.name == "s0"
    assert riders(ready) == [("s1", 1), ("s2", 1), ("s3", 1)]
    # Dispatched as far as the store and the room count know: pending, attempt 1.
    assert [(u.name, u.status, u.attempt) for u in out.steps] == [
        (n, StepStatus.PENDING, 1) for n in ("s0", "s1", "s2", "s3")
    ]
    assert run.dispatched == 4
    # The workers forward each rider: the controller publishes no StepReady of its own.
    for name in ("s0", "s1", "s2"):
        assert readies(apply_event(run, ok(run, name)).emit) == []
    last = apply_event(run, ok(run, "s3"))
    assert last.run_status is RunStatus.COMPLETED
    assert run.dispatched == 0


def test_the_rider_gets_its_cache_key_once_the_step_before_it_succeeded() -> None:
    run = chain(2)
    start_run(run, NOW)
    assert run.steps["s1"].cache_key is None  # its input's digest is not known yet
    out = apply_event(run, ok(run, "s0"))
    expected = cache_key(run.steps["s1"].spec, {"in_s0": ref("s0")})
    assert expected is not None
    assert [(u.name, u.status, u.cache_key) for u in out.steps if u.name == "s1"] == [
        ("s1", StepStatus.PENDING, expected)
    ]
    assert run.steps["s1"].cache_key == expected


def test_past_max_riders_the_controller_dispatches_the_next_segment() -> None:
    run = chain(MAX_RIDERS + 3)
    (first,) = readies(start_run(run, NOW).emit)
    assert len(first.then) == MAX_RIDERS
    for i in range(MAX_RIDERS):
        assert readies(apply_event(run, ok(run, f"s{i}")).emit) == []
    (second,) = readies(apply_event(run, ok(run, f"s{MAX_RIDERS}")).emit)
    assert second.step.name == f"s{MAX_RIDERS + 1}"
    assert riders(second) == [(f"s{MAX_RIDERS + 2}", 1)]


@pytest.mark.parametrize(
    "steps",
    [
        # The cache on: the controller decides whether to reuse each step's outputs.
        [link("a", cache=True), link("b", "a", cache=True)],
        # A fan-out: a has two children.
        [link("a"), link("b", "a"), link("c", "a")],
        # A join: c reads b and a.
        [link("a"), link("b", "a"), link("c", "a", "b")],
    ],
    ids=["cache-on", "fan-out", "join"],
)
def test_only_the_links_of_a_chain_with_the_cache_off_ride(steps: list[StepSpec]) -> None:
    run = RunState.new("r", spec(*steps))
    for ready in readies(start_run(run, NOW).emit):
        assert ready.then == []


def test_a_retried_runs_reusable_step_does_not_ride() -> None:
    run = chain(3)
    run.previous = {"s1": (None, "old-run")}  # the controller decides whether to reuse it
    (ready,) = readies(start_run(run, NOW).emit)
    assert ready.then == []


def test_the_room_of_a_run_bounds_its_riders() -> None:
    run = chain(5)
    run.max_dispatched = 3
    (ready,) = readies(start_run(run, NOW).emit)
    assert riders(ready) == [("s1", 1), ("s2", 1)]


def test_a_retry_takes_its_riders_along_with_the_attempts_they_have() -> None:
    run = chain(3, retries=1)
    start_run(run, NOW)
    out = apply_event(run, fail(run, "s0"))
    (retry,) = readies(out.emit)
    assert (retry.step.name, retry.attempt) == ("s0", 2)
    # They never ran: the same attempts ride again, and use none of their retries.
    assert riders(retry) == [("s1", 1), ("s2", 1)]
    assert run.dispatched == 3  # the riders were counted once
    # An outcome of a rider heard before its parent's is not applied (the controller
    # holds it until the parent's outcome is recorded).
    assert apply_event(run, ok(run, "s1")).steps == []
    apply_event(run, ok(run, "s0", attempt=2))
    apply_event(run, ok(run, "s1"))
    assert apply_event(run, ok(run, "s2")).run_status is RunStatus.COMPLETED


def test_a_retry_that_waits_takes_its_riders_when_it_is_due() -> None:
    run = chain(2, retries=1)
    run.steps["s0"].spec = run.steps["s0"].spec.model_copy(
        update={"retry": RetryPolicy(delay_s=5.0, backoff=1.0)}
    )
    start_run(run, NOW)
    apply_event(run, fail(run, "s0"), now=NOW)
    (retry,) = readies(dispatch_due_retries(run, NOW + timedelta(seconds=6)).emit)
    assert riders(retry) == [("s1", 1)]


def test_a_failed_step_skips_its_riders_and_frees_their_room() -> None:
    run = chain(3)
    start_run(run, NOW)
    out = apply_event(run, fail(run, "s0", retryable=False))
    assert run.steps["s1"].status is StepStatus.SKIPPED
    assert run.steps["s2"].status is StepStatus.SKIPPED
    assert out.run_status is RunStatus.FAILED
    assert run.dispatched == 0


def test_a_lapsed_lease_sends_the_riders_again_with_the_next_attempt() -> None:
    run = chain(3)
    start_run(run, NOW)
    apply_event(run, StepStarted(run_id="r", step="s0", attempt=1, by=BY))
    renew_lease(run, "s0", 1, NOW + timedelta(seconds=30))
    out = expire_leases(run, NOW + timedelta(seconds=31), max_lost=3)
    (stop,) = [e for e in out.emit if isinstance(e, AttemptsCancelled)]
    assert stop.attempts == {"s0": 1}
    (again,) = readies(out.emit)
    assert (again.step.name, again.attempt, riders(again)) == ("s0", 2, [("s1", 1), ("s2", 1)])


def test_a_reloaded_run_counts_its_riders_as_dispatched_and_not_ready() -> None:
    run = chain(3)
    start_run(run, NOW)
    dispatched = run.dispatched
    run.recount()
    assert run.dispatched == dispatched
    assert list(run.ready) == []


def test_a_riders_events_heard_before_its_parents_outcome_wait_for_it() -> None:
    # The parent's completion was handed back with a failed batch, the rider's taken first.
    run = chain(2)
    start_run(run, NOW)
    started = StepStarted(run_id="r", step="s1", attempt=1, by=BY)
    for event in (started, ok(run, "s1")):
        assert early(run, event)
        assert apply_event(run, event).steps == []
    assert not early(run, ok(run, "s0"))
    apply_event(run, ok(run, "s0"))
    assert not early(run, ok(run, "s1"))
    assert apply_event(run, ok(run, "s1")).run_status is RunStatus.COMPLETED


def test_a_worker_forwards_the_first_rider_with_its_inputs_and_the_rest() -> None:
    run = chain(3)
    (ready,) = readies(start_run(run, NOW).emit)
    sent = parse_event(encode_event(ready))  # as a worker receives it
    assert isinstance(sent, StepReady)
    following = forwarded(sent, {"output": ref("s0")})
    assert following is not None
    assert (following.step.name, following.attempt) == ("s1", 1)
    assert following.inputs == {"in_s0": ref("s0")}
    assert following.rode_on == {"output": ref("s0").digest}  # echoed by its outcome
    assert riders(following) == [("s2", 1)]
    last = forwarded(following, {"output": ref("s1")})
    assert last is not None and last.then == []
    assert forwarded(last, {"output": ref("s2")}) is None
    # What it publishes is read back the same by the next worker.
    assert parse_event(encode_event(following)) == following


def test_a_step_ready_without_riders_is_the_json_an_older_worker_reads() -> None:
    ready = readies(start_run(chain(1), NOW).emit)[0]
    assert b'"then"' not in encode_event(ready)


def _ready_with(*riders_: StepSpec) -> bytes:
    ready = StepReady(run_id="r", attempt=1, step=node("a"))
    body = ready.model_dump(mode="json")
    body["then"] = [{"step": r.model_dump(mode="json"), "attempt": 1} for r in riders_]
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("riders_", "why"),
    [
        ([node("b", "x")], "reads x.output"),
        ([node("b", "a"), node("c", "a")], "reads a.output"),
        ([node("b")], "reads nothing"),
        (
            [
                StepSpec(
                    name="b",
                    ref="m:b",
                    inputs={"x": OutputSelector(step="a", output="missing")},
                    outputs=["output"],
                )
            ],
            "reads a.missing",
        ),
        ([node(f"b{i}", "a" if i == 0 else f"b{i - 1}") for i in range(MAX_RIDERS + 1)], "then"),
    ],
    ids=["another-step", "not-the-one-before", "no-inputs", "missing-output", "too-many"],
)
def test_a_step_ready_whose_riders_are_not_a_chain_is_refused(
    riders_: list[StepSpec], why: str
) -> None:
    with pytest.raises(MalformedEvent, match=why):
        parse_event(_ready_with(*riders_))


def test_a_rider_that_read_another_executions_outputs_runs_again_with_the_recorded_ones() -> None:
    # ``s0`` ran twice (delivered again after its worker died once it forwarded ``s1``):
    # the controller recorded one execution's outputs, ``s1`` read the other's.
    run = chain(3)
    start_run(run, NOW)
    apply_event(run, ok(run, "s0"))
    other = ref("another execution of s0")
    out = apply_event(run, ok(run, "s1").model_copy(update={"rode_on": {"output": other.digest}}))
    assert run.steps["s1"].status is StepStatus.PENDING
    (stop,) = [e for e in out.emit if isinstance(e, AttemptsCancelled)]
    assert stop.attempts == {"s1": 1}
    (again,) = readies(out.emit)
    assert (again.step.name, again.attempt, riders(again)) == ("s1", 2, [("s2", 1)])
    assert again.inputs == {"in_s0": ref("s0")}
    # What it read as recorded is taken, as a step the controller dispatched.
    read = {"rode_on": {"output": ref("s0").digest}}
    apply_event(run, ok(run, "s1", attempt=2).model_copy(update=read))
    assert run.steps["s1"].status is StepStatus.COMPLETED


def test_a_riders_failure_on_another_executions_outputs_is_not_taken_either() -> None:
    run = chain(2)
    start_run(run, NOW)
    apply_event(run, ok(run, "s0"))
    failed = fail(run, "s1", retryable=False)
    out = apply_event(run, failed.model_copy(update={"rode_on": {"output": ref("x").digest}}))
    assert run.steps["s1"].status is StepStatus.PENDING
    assert [(r.step.name, r.attempt) for r in readies(out.emit)] == [("s1", 2)]
    assert out.run_status is None
