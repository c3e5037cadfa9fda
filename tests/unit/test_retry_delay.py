"""Waits before retries, called directly: the delay function, the state machine's retries
that wait, and the checks of ``@step``'s retry options."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from conveyor import Fatal, Retry, step
from conveyor.contracts import (
    MAX_RETRY_DELAY_S,
    PipelineSpec,
    RetryPolicy,
    StepFailed,
    StepReady,
    StepSpec,
    StepStatus,
    StepStatusChanged,
    WorkerFacts,
    encode_event,
    parse_event,
)
from conveyor.service.retry_delay import retry_delay
from conveyor.service.run_state import RunState
from conveyor.service.scheduling import (
    apply_event,
    cancel_run,
    dispatch_due_retries,
    next_retry,
    start_run,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BY = WorkerFacts(worker="w", pid=1)


def test_each_retry_waits_backoff_times_longer() -> None:
    policy = RetryPolicy(delay_s=2.0, backoff=3.0)
    assert [retry_delay(policy, n) for n in (1, 2, 3)] == [2.0, 6.0, 18.0]


def test_no_policy_retries_at_once() -> None:
    assert retry_delay(None, 1) == 0.0
    assert retry_delay(None, 50) == 0.0


def test_a_wait_never_passes_the_cap() -> None:
    policy = RetryPolicy(delay_s=10.0, backoff=10.0, max_delay_s=60.0)
    assert retry_delay(policy, 2) == 60.0
    # 10 ** 400 overflows a float: still the cap, not an error
    assert retry_delay(policy, 401) == 60.0
    assert retry_delay(RetryPolicy(delay_s=1.0, backoff=1.0), 100) == 1.0


def test_jitter_keeps_between_half_and_all_of_the_wait() -> None:
    policy = RetryPolicy(delay_s=4.0, backoff=2.0, jitter=True)
    assert retry_delay(policy, 2, draw=0.0) == 4.0
    assert retry_delay(policy, 2, draw=0.5) == 6.0
    assert retry_delay(policy, 2, draw=0.999) == pytest.approx(8.0, abs=0.01)
    capped = RetryPolicy(delay_s=100.0, max_delay_s=10.0, jitter=True)
    assert 5.0 <= retry_delay(capped, 3, draw=0.7) <= 10.0


def test_the_wait_a_step_asks_for_replaces_the_policy_and_is_capped() -> None:
    policy = RetryPolicy(delay_s=5.0, max_delay_s=30.0, jitter=True)
    assert retry_delay(policy, 1, asked_s=0.25, draw=0.0) == 0.25
    assert retry_delay(policy, 1, asked_s=3600.0) == 30.0
    assert retry_delay(None, 1, asked_s=2.0) == 2.0


def _run(retries: int, policy: RetryPolicy | None) -> RunState:
    steps = [
        StepSpec(name="a", ref="m:a", outputs=["output"], retries=retries, retry=policy),
        StepSpec(name="free", ref="m:free"),
    ]
    run = RunState.new("r", PipelineSpec(name="p", steps=steps))
    start_run(run, NOW)
    return run


def _failed(attempt: int, *, after: float | None = None, retryable: bool = True) -> StepFailed:
    return StepFailed(
        run_id="r",
        step="a",
        attempt=attempt,
        error="ValueError: x",
        retryable=retryable,
        retry_after_s=after,
        by=BY,
    )


def _ready(events: list[object]) -> list[tuple[str, int]]:
    return [(e.step.name, e.attempt) for e in events if isinstance(e, StepReady)]


def test_a_retry_that_waits_is_recorded_due_and_dispatched_only_then() -> None:
    run = _run(2, RetryPolicy(delay_s=0.2, backoff=2.0))
    out = apply_event(run, _failed(1), now=NOW)
    assert _ready(out.emit) == [], "no attempt is sent while the retry waits"
    (update,) = out.steps
    assert (update.status, update.attempt) == (StepStatus.PENDING, 2)
    assert update.retry_at == NOW + timedelta(seconds=0.2)
    (told,) = [e for e in out.emit if isinstance(e, StepStatusChanged)]
    assert told.retry_at == update.retry_at, "followers hear when the attempt is due"
    assert next_retry(run) == NOW + timedelta(seconds=0.2)
    assert apply_event(run, _failed(1), now=NOW).steps == [], "a duplicate changes nothing"
    assert dispatch_due_retries(run, NOW + timedelta(seconds=0.1)).emit == []
    due = dispatch_due_retries(run, NOW + timedelta(seconds=0.2))
    assert _ready(due.emit) == [("a", 2)]
    assert due.steps[0].retry_at is None and next_retry(run) is None
    later = NOW + timedelta(seconds=1)
    apply_event(run, _failed(2), now=later)
    assert next_retry(run) == later + timedelta(seconds=0.4), "the second wait doubles"


def test_retry_after_sets_the_wait_and_uses_a_retry() -> None:
    run = _run(1, None)
    apply_event(run, _failed(1, after=5.0), now=NOW)
    assert next_retry(run) == NOW + timedelta(seconds=5)
    dispatch_due_retries(run, NOW + timedelta(seconds=5))
    out = apply_event(run, _failed(2, after=5.0), now=NOW)
    assert run.steps["a"].status is StepStatus.FAILED, "its one retry is used"
    assert _ready(out.emit) == []


def test_a_fatal_failure_fails_with_retries_left() -> None:
    run = _run(5, RetryPolicy(delay_s=1.0))
    apply_event(run, _failed(1, retryable=False), now=NOW)
    assert run.steps["a"].status is StepStatus.FAILED
    assert next_retry(run) is None


def test_cancelling_drops_a_waiting_retry() -> None:
    run = _run(2, RetryPolicy(delay_s=10.0))
    apply_event(run, _failed(1), now=NOW)
    out = cancel_run(run, NOW, "cancelled by a user")
    assert [u.retry_at for u in out.steps if u.name == "a"] == [None]
    assert next_retry(run) is None
    assert dispatch_due_retries(run, NOW + timedelta(hours=1)).emit == []


def test_a_policy_travels_only_when_set() -> None:
    plain = StepSpec(name="a", ref="m:a")
    assert b'"retry"' not in plain.model_dump_json().encode()
    failed = _failed(1)
    assert b"retry_after_s" not in encode_event(failed)
    pending = StepStatusChanged(run_id="r", step="a", status=StepStatus.PENDING, attempt=2)
    assert b"retry_at" not in encode_event(pending)
    asked = parse_event(encode_event(_failed(1, after=1.5)))
    assert isinstance(asked, StepFailed) and asked.retry_after_s == 1.5
    for bad in (-1.0, math.inf, math.nan, MAX_RETRY_DELAY_S + 1):
        with pytest.raises(ValueError):
            _failed(1, after=bad)


def test_step_options_become_a_policy_and_defaults_leave_none() -> None:
    @step(retries=3, retry_delay=2.0, backoff=2.0, jitter=True)
    def patient() -> None: ...

    @step(retries=3)
    def eager() -> None: ...

    assert patient.retry == RetryPolicy(delay_s=2.0, backoff=2.0, jitter=True)
    assert eager.retry is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retries": -1}, "retries must be 0 to 100, not -1"),
        ({"retries": 101}, "retries must be 0 to 100, not 101"),
        ({"retries": 1.5}, "retries must be a whole number, not float"),
        ({"retry_delay": -0.1}, "retry_delay must be 0 to 86400 seconds, not -0.1"),
        ({"retry_delay": math.nan}, "retry_delay must be 0 to 86400 seconds, not nan"),
        ({"retry_delay": "2"}, "retry_delay must be a number of seconds, not str"),
        ({"max_retry_delay": math.inf}, "max_retry_delay must be 0 to 86400 seconds, not inf"),
        ({"backoff": 0.5}, "backoff must be 1 to 10, not 0.5"),
        ({"backoff": 1e9}, "backoff must be 1 to 10, not 1000000000.0"),
        ({"jitter": "yes"}, "jitter must be True or False, not str"),
    ],
)
def test_bad_retry_options_are_refused_in_one_line(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        step(**options)(lambda: None)  # type: ignore[call-overload]
    assert str(caught.value) == message


def test_retry_and_fatal_are_conveyor_errors_with_their_retryability() -> None:
    asked = Retry(after=3, reason="rate limited")
    assert asked.retryable and asked.after == 3.0
    assert str(asked) == "rate limited (asked for a retry in 3s)"
    assert not Fatal("bad input").retryable
    for bad in (-1, math.nan, math.inf, 10**9):
        with pytest.raises(ValueError, match="Retry"):
            Retry(after=bad)
