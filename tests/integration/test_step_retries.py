"""Retries that wait, on the embedded stack: the controller holds the wait, not a worker.

The stack has one worker slot, so a step that runs while another waits for its retry proves
that no slot slept through the wait.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from conveyor import (
    AsyncRun,
    Conveyor,
    Fatal,
    Retry,
    RunStatus,
    StepRecord,
    StepStatus,
    pipeline,
    step,
)
from conveyor.contracts import ComponentType
from conveyor.service.context import Services
from tests.conftest import ROOT, conveyor_cli
from tests.integration.api_helpers import serving, submit, wait_status
from tests.pipelines.retry_pipelines import MARKERS_ENV

RETRY_PIPELINES = f"{ROOT / 'tests' / 'pipelines' / 'retry_pipelines.py'}:asks_later"

LOCK = threading.Lock()
ATTEMPTS: dict[str, list[tuple[float, float]]] = {}
"""Per key, the (start, end) monotonic times of each attempt of a step."""
TICKS: list[tuple[float, float]] = []


def _attempt(key: str, start: float) -> int:
    with LOCK:
        ATTEMPTS.setdefault(key, []).append((start, time.monotonic()))
        return len(ATTEMPTS[key])


@step(retries=2, retry_delay=0.2, backoff=2)
def flaky(key: str) -> str:
    start = time.monotonic()
    if _attempt(key, start) < 3:
        raise ConnectionError("the service is not up yet")
    return "ok"


@step
def tick(i: int) -> int:
    start = time.monotonic()
    time.sleep(0.08)
    with LOCK:
        TICKS.append((start, time.monotonic()))
    return i + 1


@pipeline
def flaky_beside_ticks(key: str) -> None:
    flaky(key=key)
    n = tick(0)
    for _ in range(9):
        n = tick(n)


async def _waiting_retry(run: AsyncRun, timeout: float = 10.0) -> StepRecord:
    """The run's only step, once it waits for a retry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (record,) = await run.steps()
        if record.retry_at is not None:
            return record
        await asyncio.sleep(0.01)
    raise AssertionError(f"the step did not wait for a retry within {timeout:g}s")


async def _one_slot_stack(home: Path) -> str:
    services = await Services.open(home)
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "one-slot", "local", {"concurrency": 1}
        )
        await services.stacks.register_stack(
            "narrow",
            {ComponentType.ORCHESTRATOR: "one-slot", ComponentType.ARTIFACT_STORE: "default"},
        )
    finally:
        await services.close()
    return "narrow"


async def test_a_step_retried_with_backoff_waits_while_other_steps_use_the_slot(
    home: Path,
) -> None:
    TICKS.clear()
    async with Conveyor(stack=await _one_slot_stack(home)) as cv:
        run = await cv.submit(flaky_beside_ticks, key="backoff")
        record = await run.wait(timeout=60)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED
    assert (steps["flaky"].status, steps["flaky"].attempt) == (StepStatus.COMPLETED, 3)
    (a1, _), (a2, end2), (a3, _) = ATTEMPTS["backoff"]
    assert a3 - a1 >= 0.6, "waits of 0.2 s then 0.4 s before the third attempt"
    assert a3 - end2 >= 0.4
    waits = [(ATTEMPTS["backoff"][0][1], a2), (end2, a3)]
    during = [t for t in TICKS for gap in waits if gap[0] <= t[0] and t[1] <= gap[1]]
    assert during, f"no other step ran on the one slot while flaky waited: {TICKS} {waits}"


ASKED: dict[str, int] = {}


@step(retries=1, retry_delay=100.0)
def asks_to_wait(after: float) -> float:
    with LOCK:
        ASKED["n"] = ASKED.get("n", 0) + 1
        if ASKED["n"] == 1:
            raise Retry(after=after, reason="rate limited")
    return time.monotonic()


@pipeline
def rate_limited(after: float) -> None:
    asks_to_wait(after=after)


async def test_retry_after_delays_by_what_the_step_asked_and_shows_when() -> None:
    ASKED.clear()
    async with Conveyor() as cv:
        began = time.monotonic()
        run = await cv.submit(rate_limited, after=1.0)
        waiting = await _waiting_retry(run)
        assert (waiting.status, waiting.attempt) == (StepStatus.PENDING, 2)
        assert waiting.error == "Retry: rate limited (asked for a retry in 1s)"
        finished = await run.wait(timeout=30)
        ran_at = await run.load("asks_to_wait")
        (done,) = await run.steps()
    assert finished.status is RunStatus.COMPLETED
    assert ran_at - began >= 1.0, "the second attempt waited for the time the step asked"
    assert ran_at - began < 50, "Retry(after=...) replaced the policy's 100 s"
    assert done.retry_at is None


FATAL_CALLS: list[int] = []


@step(retries=3, retry_delay=0.1)
def refuses(x: int) -> int:
    FATAL_CALLS.append(x)
    raise Fatal(f"input {x} can never work")


@step
def after_refusal(y: int) -> int:
    return y


@pipeline
def refusing() -> None:
    after_refusal(refuses(1))


async def test_fatal_fails_at_once_with_retries_left_and_skips_downstream() -> None:
    FATAL_CALLS.clear()
    async with Conveyor() as cv:
        run = await cv.submit(refusing)
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.FAILED
    assert (steps["refuses"].status, steps["refuses"].attempt) == (StepStatus.FAILED, 1)
    assert steps["refuses"].error == "Fatal: input 1 can never work"
    assert steps["after_refusal"].status is StepStatus.SKIPPED
    assert FATAL_CALLS == [1]


@step(retries=2, retry_delay=30.0)
def fails_once_then_waits() -> int:
    with LOCK:
        ASKED["cancel"] = ASKED.get("cancel", 0) + 1
    raise ConnectionError("down")


@pipeline
def cancelled_while_waiting() -> None:
    fails_once_then_waits()


async def test_cancelling_a_run_during_a_retry_wait_cancels_the_retry() -> None:
    ASKED.clear()
    async with Conveyor() as cv:
        run = await cv.submit(cancelled_while_waiting)
        waiting = await _waiting_retry(run)
        shown = await asyncio.to_thread(conveyor_cli, "run", "describe", run.id)
        as_json = await asyncio.to_thread(
            conveyor_cli, "run", "describe", run.id, "--output", "json"
        )
        await cv.cancel(run.id)
        record = await run.wait(timeout=10)
        (only,) = await run.steps()
        await asyncio.sleep(0.2)
    assert waiting.retry_at is not None
    due = f"{waiting.retry_at:%Y-%m-%d %H:%M:%S} UTC"
    assert f"Step 'fails_once_then_waits' retries: attempt 2 at {due}" in shown.stdout
    (step_json,) = json.loads(as_json.stdout)["steps"]
    assert (step_json["status"], step_json["attempt"]) == ("pending", 2)
    assert datetime.fromisoformat(step_json["retry_at"]) == waiting.retry_at
    assert record.status is RunStatus.CANCELLED
    assert only.status is StepStatus.CANCELLED and only.retry_at is None
    assert ASKED["cancel"] == 1, "the waiting attempt never ran"


@pytest.mark.parametrize("isolation", ["thread", "process"])
async def test_retry_after_travels_from_either_isolation(isolation: str) -> None:
    @step(retries=1, isolation=isolation)  # type: ignore[arg-type]
    def asks() -> int:
        raise Retry(after=0.3, reason="later")

    @pipeline
    def one() -> None:
        asks()

    async with Conveyor() as cv:
        run = await cv.submit(one)
        waiting = await _waiting_retry(run)
        record = await run.wait(timeout=30)
    assert waiting.error == "Retry: later (asked for a retry in 0.3s)"
    assert record.status is RunStatus.FAILED


async def test_the_api_and_the_dashboard_show_a_retry_that_waits(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MARKERS_ENV, str(tmp_path))
    async with serving(home) as (_, api):
        run = await submit(api, RETRY_PIPELINES, parameters={"after": 60})
        steps_url = f"/api/runs/{run['id']}/steps/rate_limited"
        deadline = time.monotonic() + 20
        while (step_json := (await api.get(steps_url)).json())["retry_at"] is None:
            assert time.monotonic() < deadline, step_json
            await asyncio.sleep(0.05)
        page = (await api.get(f"/runs/{run['id']}")).text
        state = (await api.get(f"/ui/runs/{run['id']}/state")).json()
        await api.post(f"/api/runs/{run['id']}/cancel")
        finished = await wait_status(api, run["id"])
    due = datetime.fromisoformat(step_json["retry_at"])
    assert (step_json["status"], step_json["attempt"]) == ("pending", 2)
    assert f"retry at {due:%H:%M:%S.%f}"[:-3] in page
    assert state["steps"][0]["retry_at"] == step_json["retry_at"]
    assert finished["status"] == "cancelled"
