"""Reading whose a message is when it is not an event this release reads: hostile bytes, the
sender's version from a header, and the error that names both releases."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from conveyor.contracts import (
    AttemptsCancelled,
    Identity,
    MalformedEvent,
    RunRequested,
    StepFailed,
    StepReady,
    StepSpec,
    StepSucceeded,
    WorkerFacts,
    parse_event,
    read_identity,
    read_version,
)
from conveyor.contracts.events import MAX_OUTCOMES, MAX_SIBLINGS, StepsDone
from conveyor.contracts.models import MAX_ID_LENGTH, MAX_NAME_LENGTH
from conveyor.contracts.unreadable import MAX_REASON_LENGTH, MAX_UNREADABLE_BYTES, unreadable
from conveyor.service.unreadable import stand_in
from conveyor.workers import release
from conveyor.workers.release import cancelled_run, cannot_read

RUN = "57bb355f22e150e37062c89e2d7915bd"  # fixed: it names parametrized cases (two test processes)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def newer_step_ready(**step: Any) -> bytes:
    """A StepReady of a release whose steps have a field this one does not know."""
    ready = StepReady(run_id=RUN, step=StepSpec(name="train", ref="m.py:train"), attempt=2)
    data = json.loads(ready.model_dump_json())
    data["step"].update(step)
    return json.dumps(data).encode()


def test_a_newer_releases_messages_are_read_down_to_their_identity() -> None:
    ready = newer_step_ready(placement="eu-west")
    with pytest.raises(MalformedEvent, match="placement"):
        parse_event(ready)
    assert read_identity(ready) == Identity(type="StepReady", run_id=RUN, step="train", attempt=2)

    request = json.loads(RunRequested(run_id=RUN, pipeline="p.py:train").model_dump_json())
    request["priority"] = "high"
    assert read_identity(json.dumps(request)) == Identity(
        type="RunRequested", run_id=RUN, pipeline="p.py:train"
    )
    cancel = body(type="RunCancelRequested", run_id=RUN, schema_version=2, why={"a": [1]})
    assert read_identity(cancel) == Identity(type="RunCancelRequested", run_id=RUN)

    report = json.loads(
        StepSucceeded(
            run_id=RUN, step="train", attempt=3, duration_s=0.1, by=WorkerFacts(worker="w", pid=1)
        ).model_dump_json()
    )
    report["placement"] = "eu-west"
    assert read_identity(json.dumps(report)) == Identity(
        type="StepSucceeded", run_id=RUN, step="train", attempt=3
    )


def newer_cancellation(**fields: Any) -> bytes:
    """An AttemptsCancelled of a release that added a field; ``fields`` replace its own."""
    data = json.loads(AttemptsCancelled(run_id=RUN, reason="cancelled").model_dump_json())
    data["placement"] = "eu-west"
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("attempts", "whole_run"),
    [
        ({}, True),  # the run was cancelled: as this release sends it
        ({"train": 2}, False),  # superseded attempts of a run that goes on
        (..., False),  # left out: a later field may name fewer than the whole run
        (None, False),
        ([], False),
        ("all", False),
    ],
)
def test_an_unreadable_cancellation_stops_the_whole_run_only_when_it_says_so(
    attempts: Any, whole_run: bool
) -> None:
    data = newer_cancellation(attempts=attempts)
    with pytest.raises(MalformedEvent):
        parse_event(data)
    identity = read_identity(data)
    assert identity == Identity(type="AttemptsCancelled", run_id=RUN, whole_run=whole_run)
    message = unreadable(identity, "invalid event: placement", "99.1.0")
    assert cancelled_run(message) == (RUN if whole_run else None)


def test_only_a_cancellation_stops_a_run_unread() -> None:
    for type_ in ("RunCancelRequested", "RunFinished", "StepHeartbeat"):
        identity = read_identity(body(type=type_, run_id=RUN, attempts={}, placement=1))
        assert identity is not None and not identity.whole_run
        assert cancelled_run(unreadable(identity, "invalid", None)) is None


def test_the_controller_stands_in_for_what_it_cannot_read_where_someone_waits() -> None:
    """A request's run is recorded failed; a reported attempt fails without a retry; the
    rest (a heartbeat, a cancellation) nobody waits on: it only goes to the dead letters."""
    said = "invalid event: placement: Extra inputs are not permitted"
    request = stand_in(unreadable(Identity(type="RunRequested", run_id=RUN), said, "9.1"))
    assert request is not None
    event, error = request
    assert event == RunRequested(
        run_id=RUN, pipeline="unknown", event_id=event.event_id, time=event.time
    )
    assert error.startswith("this controller cannot read the request (invalid event")
    assert "the client runs Conveyor 9.1" in error

    report = Identity(type="StepFailed", run_id=RUN, step="train", attempt=2)
    found = stand_in(unreadable(report, said, None))
    assert found is not None
    failed, error = found
    assert isinstance(failed, StepFailed)
    assert (failed.step, failed.attempt, failed.retryable) == ("train", 2, False)
    assert failed.error == error and "cannot read the worker's StepFailed" in error
    assert "the worker did not say its Conveyor release" in error

    for nobody_waits in (
        Identity(type="StepHeartbeat", run_id=RUN, step="train", attempt=2),
        Identity(type="StepSucceeded", run_id=RUN),  # no attempt to fail
        Identity(type="RunCancelRequested", run_id=RUN),
    ):
        assert stand_in(unreadable(nobody_waits, said, None)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{this is not json",
        b"\xff\xfe\x00",
        b"null",
        b"[]",
        b'"StepReady"',
        b"42",
        body(run_id=RUN),  # no type
        body(type="StepReady"),  # no run
        body(type="StepExploded", run_id=RUN),  # a type this release does not know
        body(type="__class__", run_id=RUN),
        body(type=["StepReady"], run_id=RUN),
        body(type={"$ref": "StepReady"}, run_id=RUN),
        body(type="StepReady", run_id=7),
        body(type="StepReady", run_id=None),
        body(type="StepReady", run_id=""),
        body(type="StepReady", run_id="x" * (MAX_ID_LENGTH + 1)),
        body(type="StepReady", run_id={"id": RUN}),
        body(type="x" * 100_000, run_id=RUN),
        # Nesting deeper than the JSON parser's limit, in a field that is otherwise ignored.
        b'{"type": "RunRequested", "run_id": "r", "spec": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
)
def test_what_names_no_run_of_a_known_type_has_no_identity(data: bytes) -> None:
    assert read_identity(data) is None


def test_a_body_over_the_bound_is_not_read() -> None:
    head = body(type="StepReady", run_id=RUN)[:-1]
    padded = head + b', "pad": "' + b"x" * MAX_UNREADABLE_BYTES + b'"}'
    assert read_identity(padded) is None


@pytest.mark.parametrize(
    ("step", "attempt"),
    [
        ("x" * (MAX_NAME_LENGTH + 1), 1),
        ("", 1),
        (["train"], 1),
        ("train", 0),
        ("train", -1),
        ("train", 1.5),
        ("train", "one"),
        ("train", None),
        ("train", {"n": 1}),
    ],
)
def test_a_step_or_attempt_out_of_the_models_bounds_is_left_unread(step: Any, attempt: Any) -> None:
    """The run is still named; without both the step and its attempt a worker fails nothing."""
    data = body(type="StepReady", run_id=RUN, step={"name": step, "x": [1]}, attempt=attempt)
    assert read_identity(data) == Identity(type="StepReady", run_id=RUN)


def test_wildcards_and_huge_numbers_are_data_not_patterns() -> None:
    """Ids are matched exactly wherever they are used: ``%`` and ``_`` are only characters."""
    for run_id in ("%", "_" * 32, "r%_'; DROP TABLE runs; --"):
        data = body(type="StepReady", run_id=run_id, step={"name": "%"}, attempt=1)
        assert read_identity(data) == Identity(type="StepReady", run_id=run_id, step="%", attempt=1)
    huge = b'{"type": "StepReady", "run_id": "r", "step": {"name": "s"}, "attempt": 1' + b"0" * 5000
    assert read_identity(huge + b"}") is None


def test_nothing_a_message_names_is_imported() -> None:
    module = "conveyor_test_never_imported"
    data = body(
        type="RunRequested",
        run_id=RUN,
        pipeline=f"{module}:pipeline",
        spec={"name": "p", "steps": [{"name": "s", "ref": f"{module}:f", "evil": True}]},
        __reduce__=["os", "system"],
    )
    assert read_identity(data) == Identity(
        type="RunRequested", run_id=RUN, pipeline=f"{module}:pipeline"
    )
    assert module not in sys.modules


def test_a_reason_is_cut_to_its_bound() -> None:
    identity = Identity(type="RunRequested", run_id=RUN)
    told = unreadable(identity, "invalid event: " + "k" * 100_000, None)
    assert len(told.reason) == MAX_REASON_LENGTH and told.reason.endswith("...")


@pytest.mark.parametrize(
    ("header", "version"),
    [
        ("0.1.0", "0.1.0"),
        (b"1.4.2", "1.4.2"),
        ("2.0.0rc1+local.7", "2.0.0rc1+local.7"),
        (None, None),
        ("", None),
        ("1.0\n", None),
        ("1.0; rm -rf /", None),
        ("%", None),
        ("_1", None),
        ("1" * 65, None),
        (b"1" * 10_000, None),
        (b"\xff\xfe", None),
        (7, None),
        (["1.0"], None),
        ({"v": "1.0"}, None),
    ],
)
def test_a_senders_version_header_is_read_only_when_it_looks_like_one(
    header: object, version: str | None
) -> None:
    assert read_version(header) == version


@pytest.mark.parametrize(
    ("sender", "advice"),
    [
        (
            "1.5.0",
            "the controller runs Conveyor 1.5.0, this worker Conveyor 1.4.2; "
            "upgrade this worker to Conveyor 1.5.0",
        ),
        ("1.10.0", "upgrade this worker to Conveyor 1.10.0"),
        ("1.3.9", "upgrade the controller to Conveyor 1.4.2"),
        ("dev", "upgrade the older of the two"),
        (
            None,
            "the controller did not say its Conveyor release (older ones do not) and this "
            "worker runs Conveyor 1.4.2",
        ),
    ],
)
def test_the_error_names_both_releases_and_which_to_upgrade(
    sender: str | None, advice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(release, "conveyor_version", lambda: "1.4.2")
    error = cannot_read("worker", "step", "controller", "invalid event: step.x: nope", sender)
    assert error.startswith("this worker cannot read the step (invalid event: step.x: nope): ")
    assert advice in error


def newer_steps_done(*outcomes: dict[str, Any]) -> bytes:
    """A StepsDone of a release whose reports have a field this one does not know."""
    return body(type="StepsDone", run_id=RUN, outcomes=list(outcomes), schema_version=2)


def report(step: Any, attempt: Any, run_id: str = RUN) -> dict[str, Any]:
    by = {"worker": "w", "pid": 1}
    return {"type": "StepSucceeded", "run_id": run_id, "step": step, "attempt": attempt, "by": by}


def test_a_newer_steps_done_is_read_down_to_the_attempts_of_its_outcomes() -> None:
    data = newer_steps_done(
        {**report("train", 1), "placement": "eu-west"},
        {**report("score", 2), "placement": "eu-west"},
        report("x" * (MAX_NAME_LENGTH + 1), 1),  # not a step name: left out, the rest read
        report("train", "x"),
        report("train", 0),
        report("other", 1, run_id="f" * 32),  # of another run: not this message's to fail
        "not an outcome",
    )
    with pytest.raises(MalformedEvent):
        parse_event(data)
    identity = read_identity(data)
    assert identity == Identity(type="StepsDone", run_id=RUN, carried=(("train", 1), ("score", 2)))
    # Too many to be a StepsDone: none is read, the message is only dead-lettered.
    many = newer_steps_done(*(report(f"s{i}", 1) for i in range(MAX_OUTCOMES + 1)))
    assert read_identity(many) == Identity(type="StepsDone", run_id=RUN)


def test_the_controller_fails_each_attempt_of_a_steps_done_it_cannot_read() -> None:
    said = "invalid event: outcomes.0.placement: Extra inputs are not permitted"
    two = Identity(type="StepsDone", run_id=RUN, carried=(("train", 1), ("score", 2)))
    found = stand_in(unreadable(two, said, "99.1.0"))
    assert found is not None
    done, error = found
    assert isinstance(done, StepsDone)
    assert [(o.step, o.attempt, o.retryable) for o in done.outcomes] == [
        ("train", 1, False),
        ("score", 2, False),
    ]
    assert all(isinstance(o, StepFailed) and o.error == error for o in done.outcomes)
    assert "cannot read the worker's StepsDone" in error and "Conveyor 99.1.0" in error

    one = Identity(type="StepsDone", run_id=RUN, carried=(("train", 1),))
    found = stand_in(unreadable(one, said, None))
    assert found is not None and isinstance(found[0], StepFailed)
    assert (found[0].step, found[0].attempt) == ("train", 1)

    assert stand_in(unreadable(Identity(type="StepsDone", run_id=RUN), said, None)) is None


def test_a_newer_step_ready_is_read_down_to_its_siblings_not_its_riders() -> None:
    def sibling(name: Any, attempt: Any, run_id: str = RUN) -> dict[str, Any]:
        return {"run_id": run_id, "step": {"name": name, "ref": "m.py:f"}, "attempt": attempt}

    data = json.loads(newer_step_ready(placement="eu-west"))
    data["then"] = [{"step": {"name": "after", "ref": "m.py:f"}, "attempt": 1}]
    data["siblings"] = [
        sibling("branch_2", 1),
        sibling("branch_3", 4),
        sibling("branch_4", 0),  # not an attempt: left out, the rest read
        sibling("branch_5", 1, run_id="f" * 32),
        {"step": "not a spec"},
    ]
    identity = read_identity(json.dumps(data))
    assert identity == Identity(
        type="StepReady",
        run_id=RUN,
        step="train",
        attempt=2,
        carried=(("branch_2", 1), ("branch_3", 4)),
    )
    message = unreadable(identity, "invalid event: step.placement", "99.1.0")
    refused = release.attempts_refused(message.identity, "refused", WorkerFacts(worker="w", pid=1))
    assert [(f.step, f.attempt, f.retryable) for f in refused] == [
        ("train", 2, False),
        ("branch_2", 1, False),
        ("branch_3", 4, False),
    ]
    # More siblings than a StepReady carries: none is read.
    data["siblings"] = [sibling(f"b{i}", 1) for i in range(MAX_SIBLINGS + 1)]
    assert read_identity(json.dumps(data)) == Identity(
        type="StepReady", run_id=RUN, step="train", attempt=2
    )
