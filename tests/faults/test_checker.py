"""The fault suite's checker and schedule, on made-up data: each count and each violation."""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.checker import (
    DeadLetter,
    Execution,
    FaultWindow,
    RunOutcome,
    StepOutcome,
    check,
    latencies,
    parse_ledger,
    re_executions,
    recovery_times,
)
from tests.faults.nemesis import HELD, KINDS, parse_kinds, plan

RUN = "r1"


def mark(step: str, nonce: str, attempt: int = 1, inputs: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"run": RUN, "step": step, "attempt": attempt, "nonce": nonce, "inputs": list(inputs)}


def chain(**changes: Any) -> tuple[RunOutcome, list[Execution]]:
    """A completed run ``a -> b``, each step executed once; ``changes`` edits step b."""
    executions = [Execution(RUN, "a", 1, "na", 10), Execution(RUN, "b", 1, "nb", 11)]
    a = StepOutcome("a", "completed", 1, (), mark("a", "na"), artifacts=1)
    b_fields: dict[str, Any] = {
        "name": "b",
        "status": "completed",
        "attempt": 1,
        "upstream": ("a",),
        "mark": mark("b", "nb", inputs=("na",)),
        "artifacts": 1,
    }
    b = StepOutcome(**{**b_fields, **changes})
    return RunOutcome(RUN, "completed", None, (a, b)), executions


def test_a_clean_run_passes() -> None:
    run, executions = chain()
    verdict = check([RUN], [run], executions, [], ["ok"])
    assert verdict.problems() == []
    assert verdict.counts()["completed"] == 1
    assert verdict.counts()["re_executions"] == 0


def test_a_re_execution_is_counted_but_is_no_violation() -> None:
    run, executions = chain()
    executions.append(Execution(RUN, "b", 1, "nb-again", 12))  # the same attempt, redelivered
    verdict = check([RUN], [run], executions, [], ["ok"])
    assert verdict.re_executions == 1
    assert verdict.problems() == []


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"mark": None}, "without a readable output"),
        ({"mark": mark("b", "unknown", inputs=("na",))}, "the ledger does not hold"),
        ({"mark": mark("a", "na", inputs=())}, "recorded output is r1/a's"),
        ({"attempt": 2}, "recorded output of attempt 1, step at 2"),
        ({"mark": mark("b", "nb", inputs=("na-other",))}, "consumed another execution's"),
        ({"artifacts": 2}, "2 artifact records for 1 output"),
    ],
)
def test_a_result_that_is_not_one_executions_effect_is_applied_twice(
    changes: dict[str, Any], said: str
) -> None:
    run, executions = chain(**changes)
    executions.append(Execution(RUN, "a", 1, "na-other", 12))
    verdict = check([RUN], [run], executions, [], ["ok"])
    [violation] = verdict.applied_twice
    assert (violation.run_id, violation.step) == (RUN, "b")
    assert said in violation.what
    assert "applied twice" in verdict.problems()[0]


def test_lost_stuck_unexpected_and_failures_are_told_apart() -> None:
    runs = [
        RunOutcome("done", "completed"),
        RunOutcome("failed", "failed", "StepFailed: boom"),
        RunOutcome("silent", "failed", None),
        RunOutcome("waiting", "running"),
        RunOutcome("pending", "pending"),
        RunOutcome("stranger", "completed"),
        RunOutcome("stopped", "cancelled", "not needed"),
    ]
    submitted = ["done", "failed", "silent", "waiting", "pending", "never", "stopped"]
    verdict = check(submitted, runs, [], [], ["ok"])
    counts = verdict.counts()
    assert counts["submitted"] == 7
    assert counts["completed"] == 2  # "stranger" too: it is recorded as completed
    assert counts["failed_with_reason"] == 1 and counts["failed_without_reason"] == 1
    assert counts["cancelled"] == 1
    assert verdict.lost == ["never"]
    assert sorted(verdict.stuck) == ["pending", "waiting"]
    assert verdict.unexpected == ["stranger"]
    assert verdict.failures == {"StepFailed: boom": 1}
    assert len(verdict.problems()) == 4


def test_a_dead_letter_is_explained_only_by_a_run_that_failed_with_a_reason() -> None:
    runs = [RunOutcome("failed", "failed", "delivered 5 times"), RunOutcome("ok", "completed")]
    letters = [
        DeadLetter("StepReady", "failed", "train", "delivery limit"),
        DeadLetter("StepReady", "ok", "train", "delivery limit"),
        DeadLetter("unparsable", None, None, "invalid event"),
    ]
    verdict = check(["failed", "ok"], runs, [], letters, ["ok"])
    assert len(verdict.dead_letters) == 3
    assert [d.run_id for d in verdict.unexplained_dead_letters] == ["ok", None]


def test_integrity_rows_other_than_ok_are_problems() -> None:
    assert check([], [], [], [], ["ok"]).integrity == []
    bad = check([], [], [], [], ["row 3 missing from index runs_stack"])
    assert bad.integrity == ["row 3 missing from index runs_stack"]
    assert check([], [], [], [], []).integrity == ["integrity_check returned nothing"]


def test_the_ledger_skips_a_torn_line() -> None:
    text = "r1 a 1 n1 10\nr1 b 2 n2 11\nr1 c 1 n3"
    assert parse_ledger(text) == [
        Execution("r1", "a", 1, "n1", 10),
        Execution("r1", "b", 2, "n2", 11),
    ]
    assert re_executions(parse_ledger(text + "\nr1 b 3 n4 12\nr1 b 3 n5 13\n")) == 2


def test_recovery_is_timed_from_the_fault_to_the_first_completion_after_it_was_lifted() -> None:
    faults = [FaultWindow("freeze-broker", 110.0, 113.0), FaultWindow("cut-broker", 150.0, 150.0)]
    [freeze, cut] = recovery_times(faults, [112.0, 114.5, 160.0], [116.0], origin=100.0)
    assert (freeze.at_s, freeze.held_s, freeze.to_next_step_s, freeze.to_next_run_s) == (
        10.0,
        3.0,
        4.5,
        6.0,
    )
    assert (cut.to_next_step_s, cut.to_next_run_s) == (10.0, None)


def test_the_schedule_is_seeded_spread_and_tries_every_kind() -> None:
    count = 2 * len(KINDS)
    first = plan(7, KINDS, count, span_s=30.0, workers=3)
    assert first == plan(7, KINDS, count, span_s=30.0, workers=3)
    assert first != plan(8, KINDS, count, span_s=30.0, workers=3)
    assert sorted(f.kind for f in first) == sorted(KINDS * 2)
    times = [f.at_s for f in first]
    assert times == sorted(times) and times[0] >= 2.0 and times[-1] <= 32.0
    assert {f.target for f in first} <= {0, 1, 2}
    assert all((f.hold_s > 0) == (f.kind in HELD) for f in first)


def test_fault_kinds_are_chosen_by_name() -> None:
    assert parse_kinds("all") == KINDS
    assert parse_kinds("cut-broker, kill-worker,cut-broker") == ("cut-broker", "kill-worker")
    with pytest.raises(ValueError, match="unknown fault kinds"):
        parse_kinds("kill-broker")


def test_latency_counts_the_runs_that_ended() -> None:
    assert latencies({"a": 10.0, "b": 11.0, "c": 12.0}, {"a": 13.5, "b": 11.5}) == [0.5, 3.5]
