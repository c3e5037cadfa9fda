"""Siblings: how a batch's StepReady are put together and taken apart, and what a message
with siblings may hold (it comes from outside: a broker anyone may publish to)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from conveyor.contracts import (
    MalformedEvent,
    StepReady,
    StepSpec,
    StepStatus,
    StepStatusChanged,
    encode_event,
    parse_event,
)
from conveyor.contracts.events import MAX_SIBLINGS, bundled, unbundled
from conveyor.service.batches import SPREAD, Batch
from conveyor.service.run_state import Transition


def ready(name: str, *, run_id: str = "r1", pool: str = "default") -> StepReady:
    return StepReady(run_id=run_id, step=StepSpec(name=name, ref="m:f", pool=pool), attempt=1)


def names(message: StepReady) -> list[str]:
    return [message.step.name, *(s.step.name for s in message.siblings)]


def test_a_fan_out_of_100_goes_out_twelve_to_a_message_in_order() -> None:
    steps = [ready(f"b{i}") for i in range(100)]
    messages = bundled(steps, SPREAD)
    assert [len(names(m)) for m in messages] == [12] * 8 + [4]
    assert [n for m in messages for n in names(m)] == [f"b{i}" for i in range(100)]


@pytest.mark.parametrize(("steps", "sizes"), [(15, [1] * 15), (16, [2] * 8), (17, [2] * 8 + [1])])
def test_fewer_than_two_messages_a_slot_of_spread_go_out_alone(
    steps: int, sizes: list[int]
) -> None:
    messages = bundled([ready(f"b{i}") for i in range(steps)], SPREAD)
    assert [len(names(m)) for m in messages] == sizes


def test_a_message_carries_at_most_sixteen_steps() -> None:
    messages = bundled([ready(f"b{i}") for i in range(1000)], SPREAD)
    assert max(len(names(m)) for m in messages) == MAX_SIBLINGS + 1 == 16
    assert len(messages) == 63


def test_steps_of_two_pools_go_out_in_messages_of_their_own_pool() -> None:
    steps = [ready(f"b{i}", pool="gpu" if i % 2 else "default") for i in range(40)]
    for message in bundled(steps, SPREAD):
        pools = {message.step.pool, *(s.step.pool for s in message.siblings)}
        assert len(pools) == 1


def test_a_message_with_siblings_round_trips_and_comes_apart_as_it_went_out() -> None:
    steps = [ready(f"b{i}") for i in range(16)]
    [first, *_] = bundled(steps, SPREAD)
    assert names(first) == ["b0", "b1"]
    parsed = parse_event(encode_event(first))
    assert parsed == first
    assert isinstance(parsed, StepReady)
    assert unbundled(parsed) == steps[:2]
    assert unbundled(steps[5]) == [steps[5]]


def test_a_batch_publishes_a_runs_other_events_first_then_its_steps_bundled() -> None:
    status = StepStatusChanged(run_id="r1", step="origin", status=StepStatus.COMPLETED, attempt=1)
    alone = ready("alone", run_id="r2")
    batch = Batch(now=datetime.now(UTC))
    batch.change("r1", Transition(emit=[ready(f"b{i}") for i in range(8)]))
    batch.change("r1", Transition(emit=[status, *(ready(f"c{i}") for i in range(8))]))
    batch.change("r2", Transition(emit=[alone]))
    first, *steps, last = batch.events()
    assert first == status and last is alone
    assert [names(e) for e in steps if isinstance(e, StepReady)] == [
        *([f"b{2 * i}", f"b{2 * i + 1}"] for i in range(4)),
        *([f"c{2 * i}", f"c{2 * i + 1}"] for i in range(4)),
    ]
    assert len(steps) == 8


def _with(head: dict[str, object], siblings: list[dict[str, object]]) -> bytes:
    return json.dumps({**head, "siblings": siblings}).encode()


def _ready_json(name: str, run_id: str = "r1", pool: str = "default") -> dict[str, object]:
    return {
        "type": "StepReady",
        "run_id": run_id,
        "attempt": 1,
        "step": {"name": name, "ref": "m:f", "pool": pool},
    }


@pytest.mark.parametrize(
    ("siblings", "why"),
    [
        ([_ready_json("b1", run_id="other")], "same run"),
        ([_ready_json("b1", pool="gpu")], "another pool"),
        ([{**_ready_json("b1"), "siblings": [_ready_json("b2")]}], "no siblings"),
        ([_ready_json(f"b{i}") for i in range(MAX_SIBLINGS + 1)], "at most 15"),
        ([{"type": "StepReady"}], "run_id"),
    ],
    ids=["another-run", "another-pool", "nested", "too-many", "not-a-step"],
)
def test_a_message_whose_siblings_are_not_of_its_run_and_pool_is_refused(
    siblings: list[dict[str, object]], why: str
) -> None:
    with pytest.raises(MalformedEvent, match=why):
        parse_event(_with(_ready_json("b0"), siblings))
