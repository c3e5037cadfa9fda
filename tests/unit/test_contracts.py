"""The wire contract: public names are pinned and every event's JSON Schema is snapshotted.

A change to an event is a visible diff of tests/snapshots/event_schemas.json. To accept a
deliberate change, run with CONVEYOR_UPDATE_SNAPSHOTS=1 and commit the new snapshot.
"""

from __future__ import annotations

import json
import os
import pkgutil
from pathlib import Path

import pytest
from pydantic import ValidationError as PydanticValidationError

import conveyor
import conveyor.contracts as contracts
from conveyor.contracts import (
    MalformedEvent,
    OutputSelector,
    PipelineSpec,
    RunFinished,
    RunProgress,
    RunStatus,
    StepReady,
    StepSpec,
    StepStatus,
    StepStatusChanged,
    encode_event,
    event_json_schemas,
    parse_event,
    progress_of,
)

SNAPSHOT = Path(__file__).parents[1] / "snapshots" / "event_schemas.json"


def test_public_names_are_pinned() -> None:
    assert set(conveyor.__all__) == {
        "ArtifactRef",
        "AsyncRun",
        "Client",
        "Conveyor",
        "ConveyorError",
        "Fatal",
        "Materializer",
        "PipelineDefinition",
        "Retry",
        "RunFailed",
        "RunHandle",
        "RunRecord",
        "RunStatus",
        "StackSpec",
        "StepDefinition",
        "StepRecord",
        "StepStatus",
        "pipeline",
        "register_materializer",
        "step",
    }
    # The names are imported on first use (conveyor/__init__.py): each must resolve.
    for name in conveyor.__all__:
        assert getattr(conveyor, name) is not None
    with pytest.raises(AttributeError):
        _ = conveyor.Nope  # type: ignore[attr-defined]
    for name in contracts.__all__:
        assert getattr(contracts, name) is not None


def test_no_public_name_is_also_a_submodule() -> None:
    """Names are imported on first use, and importing a submodule sets it on its package:
    a public name shared with a submodule would be the module or the name by import order."""
    submodules = {module.name for module in pkgutil.iter_modules(contracts.__path__)}
    assert not submodules & set(contracts.__all__)


def test_event_schemas_match_snapshot() -> None:
    current = json.loads(json.dumps(event_json_schemas(), sort_keys=True))
    if os.environ.get("CONVEYOR_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_event_round_trips_through_json() -> None:
    event = StepReady(run_id="r", attempt=1, step=StepSpec(name="a", ref="m:a"))
    assert parse_event(encode_event(event)) == event


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"not json", "invalid event"),
        (b'{"type": "Nope", "run_id": "r"}', "invalid event"),
        (
            b'{"type": "RunFinished", "run_id": "r", "status": "completed", "schema_version": 2}',
            "schema_version",
        ),
        (b'{"type": "RunFinished", "run_id": "r", "status": "completed", "extra": 1}', "extra"),
    ],
)
def test_malformed_events_are_refused_with_a_reason(data: bytes, why: str) -> None:
    with pytest.raises(MalformedEvent, match=why):
        parse_event(data)


def test_events_are_immutable() -> None:
    event = StepReady(run_id="r", attempt=1, step=StepSpec(name="a", ref="m:a"))
    with pytest.raises(Exception, match="frozen"):
        event.attempt = 2  # type: ignore[misc]


def test_progress_folds_step_changes_per_run_ahead_of_other_events() -> None:
    def change(run: str, step: str) -> StepStatusChanged:
        return StepStatusChanged(run_id=run, step=step, status=StepStatus.COMPLETED, attempt=1)

    ready = StepReady(run_id="a", attempt=1, step=StepSpec(name="s3", ref="m:s3"))
    finished = RunFinished(run_id="b", status=RunStatus.COMPLETED)
    events = [change("a", "s1"), ready, change("b", "t1"), change("a", "s2"), finished]
    folded = progress_of(events)
    assert [type(e).__name__ for e in folded] == [
        "RunProgress",
        "RunProgress",
        "StepReady",
        "RunFinished",
    ]
    first, second = folded[0], folded[1]
    assert isinstance(first, RunProgress) and isinstance(second, RunProgress)
    assert (first.run_id, [c.step for c in first.changes]) == ("a", ["s1", "s2"])
    assert (second.run_id, [c.step for c in second.changes]) == ("b", ["t1"])


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        ([StepSpec(name="a", ref="m:f"), StepSpec(name="a", ref="m:g")], "two steps are named"),
        (
            [StepSpec(name="b", ref="m:f", inputs={"x": OutputSelector(step="ghost", output="o")})],
            "which no earlier step",
        ),
        (
            [
                StepSpec(name="a", ref="m:f", outputs=["output"]),
                StepSpec(
                    name="b", ref="m:f", inputs={"x": OutputSelector(step="a", output="nope")}
                ),
            ],
            "reads output 'nope'",
        ),
        (
            [
                StepSpec(name="b", ref="m:f", inputs={"x": [OutputSelector(step="a", output="o")]}),
                StepSpec(name="a", ref="m:f", outputs=["o"]),
            ],
            "which no earlier step",
        ),
    ],
)
def test_a_pipeline_spec_is_a_dag_in_call_order(steps: list[StepSpec], problem: str) -> None:
    with pytest.raises(PydanticValidationError, match=problem):
        PipelineSpec(name="p", steps=steps)
    # On the wire the same spec is an invalid event, which goes to the dead letters.
    body = json.dumps(
        {
            "type": "RunRequested",
            "run_id": "r",
            "pipeline": "p",
            "spec": {"name": "p", "steps": [s.model_dump(mode="json") for s in steps]},
        }
    )
    with pytest.raises(MalformedEvent, match=problem):
        parse_event(body.encode())


def test_a_step_without_isolation_is_sent_as_workers_before_the_field_expect() -> None:
    plain = StepReady(run_id="r", attempt=1, step=StepSpec(name="a", ref="m:a"))
    assert b"isolation" not in encode_event(plain)
    isolated = StepSpec(name="a", ref="m:a", isolation="process")
    sent = encode_event(StepReady(run_id="r", attempt=1, step=isolated))
    assert parse_event(sent).step.isolation == "process"  # type: ignore[union-attr]


def test_an_artifact_ref_made_of_a_blob_is_the_validated_one() -> None:
    blob = contracts.BlobRef(uri="file:///a/b", digest="blake3:" + "a" * 64, size=3)
    made = contracts.ArtifactRef.of(blob, materializer="json", version="1", data_type="x.Y")
    checked = contracts.ArtifactRef.model_validate(made.model_dump())
    assert made == checked and made.model_dump_json() == checked.model_dump_json()
    assert made.model_fields_set == checked.model_fields_set
    # Names beyond their bounds are refused as before.
    with pytest.raises(PydanticValidationError):
        contracts.ArtifactRef.of(blob, materializer="m" * 101, version=None, data_type="x")
    with pytest.raises(PydanticValidationError):
        contracts.ArtifactRef.of(blob, materializer="json", version="1", data_type="x" * 501)


def test_trusted_events_equal_validated_ones() -> None:
    from conveyor.contracts import ArtifactRef, StepSucceeded, WorkerFacts
    from conveyor.contracts.events import trusted

    ref = ArtifactRef(
        uri="blobs/ab",
        digest="sha256:" + "a" * 64,
        size=1,
        materializer="json",
        materializer_version="1",
        data_type="builtins.int",
    )
    fields = {
        "run_id": "a" * 32,
        "step": "s",
        "attempt": 1,
        "outputs": {"output": ref},
        "duration_s": 0.5,
        "by": WorkerFacts(worker="w", pid=1),
    }
    made = trusted(StepSucceeded, **fields)
    checked = StepSucceeded(**fields, event_id=made.event_id, time=made.time)
    assert made == checked
    assert made.model_dump_json() == checked.model_dump_json()
    assert made.logs is None
    # Defaults made by factories are fresh for each event.
    assert trusted(StepSucceeded, **fields).event_id != made.event_id
    changed = trusted(
        StepStatusChanged, run_id="a" * 32, step="s", status=StepStatus.PENDING, attempt=1
    )
    assert (
        changed.outputs == {}
        and changed.outputs
        is not trusted(
            StepStatusChanged, run_id="a" * 32, step="s", status=StepStatus.PENDING, attempt=1
        ).outputs
    )
    assert json.loads(encode_event(changed))["type"] == "StepStatusChanged"


def test_each_event_type_is_routed_by_its_class() -> None:
    """The topology routes by the type name an event carries (importing the classes would
    build every event model): each name it knows must be the class's, and each class sent."""
    from conveyor.contracts import (
        EVENT_TYPES,
        AttemptsCancelled,
        RunCancelRequested,
        RunRequested,
        Topology,
        is_control_event,
        is_status_event,
    )

    topology = Topology(stack="s")
    for cls in EVENT_TYPES:
        fields = {"step": StepSpec(name="a", ref="m:a", pool="gpu")} if cls is StepReady else {}
        event = cls.model_construct(run_id="r", **fields)
        status = cls in (StepStatusChanged, RunProgress, RunFinished)
        control = cls is AttemptsCancelled
        if cls is StepReady:
            expected = topology.step_queue("gpu")
        elif cls in (RunRequested, RunCancelRequested):
            expected = topology.runs_queue
        elif status:
            expected = "r"
        elif control:
            expected = ""
        else:
            expected = topology.events_queue
        assert topology.route(event) == expected, cls  # type: ignore[arg-type]
        assert (is_status_event(event), is_control_event(event)) == (status, control), cls  # type: ignore[arg-type]
