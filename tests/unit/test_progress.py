"""ProgressBuffer: followers get every status change, in order, at most once per interval."""

from __future__ import annotations

from conveyor.contracts import (
    Event,
    RunFinished,
    RunProgress,
    RunStatus,
    StepReady,
    StepSpec,
    StepStatus,
    StepStatusChanged,
)
from conveyor.service.progress import ProgressBuffer


def change(run: str, step: str) -> StepStatusChanged:
    return StepStatusChanged(run_id=run, step=step, status=StepStatus.COMPLETED, attempt=1)


def steps_of(events: list[Event]) -> list[tuple[str, list[str]]]:
    return [(e.run_id, [c.step for c in e.changes]) for e in events if isinstance(e, RunProgress)]


def test_the_first_change_goes_out_at_once_and_the_next_wait_for_the_interval() -> None:
    buffer = ProgressBuffer(every_s=0.2)
    assert steps_of(buffer.outgoing([change("r", "a")], now=10.0)) == [("r", ["a"])]
    assert buffer.outgoing([change("r", "b")], now=10.05) == []
    assert buffer.outgoing([change("r", "c")], now=10.1) == []
    assert buffer.pending and buffer.due == 10.2
    # Due: everything held goes out in one RunProgress, in the order it happened.
    assert steps_of(buffer.outgoing([change("r", "d")], now=10.2)) == [("r", ["b", "c", "d"])]
    assert not buffer.pending


def test_release_all_sends_what_is_held_when_no_batch_comes() -> None:
    buffer = ProgressBuffer(every_s=0.2)
    buffer.outgoing([change("r", "a")], now=0.0)
    buffer.outgoing([change("r", "b"), change("s", "x")], now=0.1)
    assert steps_of(buffer.release_all(now=0.2)) == [("r", ["b"]), ("s", ["x"])]
    assert buffer.release_all(now=0.3) == []
    # After a quiet spell the next change is not held.
    assert steps_of(buffer.outgoing([change("r", "c")], now=5.0)) == [("r", ["c"])]


def test_other_events_are_never_held() -> None:
    buffer = ProgressBuffer(every_s=0.2)
    buffer.outgoing([change("r", "a")], now=0.0)
    ready = StepReady(run_id="r", attempt=1, step=StepSpec(name="b", ref="m:b"))
    assert buffer.outgoing([change("r", "b"), ready], now=0.1) == [ready]


def test_a_finishing_run_releases_its_changes_before_its_run_finished_only() -> None:
    buffer = ProgressBuffer(every_s=0.2)
    buffer.outgoing([change("other", "x")], now=0.0)
    buffer.outgoing([change("r", "a"), change("other", "y")], now=0.05)
    finished = RunFinished(run_id="r", status=RunStatus.COMPLETED)
    out = buffer.outgoing([change("r", "b"), finished], now=0.1)
    assert steps_of(out) == [("r", ["a", "b"])]
    assert out[-1] is finished
    # The other run's change is still held until it is due.
    assert steps_of(buffer.release_all(now=0.2)) == [("other", ["y"])]
