"""StepsDone: the outcomes of the steps a worker ran on one message (a chain's run in
place, a fan-out's siblings), in one message. It comes from outside the controller (a
broker anyone may publish to): each outcome is checked as one that came alone, and all of
them must be of the message's run."""

from __future__ import annotations

import json

import pytest

from conveyor.contracts import MalformedEvent, StepSucceeded, WorkerFacts, encode_event, parse_event
from conveyor.contracts.events import MAX_OUTCOMES, MAX_RIDERS, StepsDone

BY = WorkerFacts(worker="w", pid=1)


def succeeded(step: str, run_id: str = "r1") -> StepSucceeded:
    return StepSucceeded(run_id=run_id, step=step, attempt=1, duration_s=0.01, by=BY)


def test_the_outcomes_of_a_chain_round_trip_in_their_order() -> None:
    done = StepsDone(run_id="r1", outcomes=[succeeded(f"s{i}") for i in range(MAX_RIDERS + 1)])
    parsed = parse_event(encode_event(done))
    assert parsed == done
    assert isinstance(parsed, StepsDone)
    assert [o.step for o in parsed.outcomes] == [f"s{i}" for i in range(MAX_RIDERS + 1)]


def _done(outcomes: list[dict[str, object]]) -> bytes:
    return json.dumps({"type": "StepsDone", "run_id": "r1", "outcomes": outcomes}).encode()


def _outcome(step: str, run_id: str = "r1") -> dict[str, object]:
    return json.loads(encode_event(succeeded(step, run_id)))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("outcomes", "why"),
    [
        ([_outcome("a"), _outcome("b", run_id="other")], "another run"),
        ([_outcome("a")], "at least 2"),
        ([_outcome(f"s{i}") for i in range(MAX_OUTCOMES + 1)], "at most 272"),
        ([_outcome("a"), {"type": "StepStarted", "run_id": "r1"}], "outcomes.1"),
        ([_outcome("a"), {**_outcome("b"), "attempt": "%_"}], "attempt"),
    ],
    ids=["another-run", "alone", "too-many", "not-an-outcome", "hostile-attempt"],
)
def test_outcomes_not_of_the_run_or_not_outcomes_are_refused(
    outcomes: list[dict[str, object]], why: str
) -> None:
    with pytest.raises(MalformedEvent, match=why):
        parse_event(_done(outcomes))
