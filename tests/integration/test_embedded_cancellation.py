"""Runs on the embedded stack that end before their steps do: cancelled by their user, or
still going when their stack stops."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.service.context import Services

SLOW_STARTED = threading.Event()


@step(cache=False)
def slow_first() -> int:
    SLOW_STARTED.set()
    time.sleep(0.3)
    return 1


@step(cache=False)
def then_this(x: int) -> int:
    return x + 1


@pipeline
def slow_chain() -> None:
    then_this(slow_first())


@step
async def blocker(marker: str) -> int:
    Path(marker).touch()
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        Path(marker + ".cancelled").touch()
        raise
    return 1


@pipeline
def blocking(marker: str) -> None:
    then_this(blocker(marker))


async def test_cancel_marks_unfinished_steps_cancelled_and_stops_the_running_one(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "started"
    async with Conveyor() as cv:
        run = await cv.submit(blocking, marker=str(marker))
        for _ in range(200):
            if marker.exists():
                break
            await asyncio.sleep(0.05)
        await cv.cancel(run.id, "changed my mind")
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
        for _ in range(100):
            if Path(f"{marker}.cancelled").exists():
                break
            await asyncio.sleep(0.05)
    assert Path(f"{marker}.cancelled").exists(), "the running step was not stopped"
    assert record.status is RunStatus.CANCELLED and record.error == "changed my mind"
    assert {s.status for s in steps.values()} == {StepStatus.CANCELLED}


async def test_a_run_still_going_when_its_stack_stops_ends_cancelled(home: Path) -> None:
    """Its next steps would go to workers that stop with the stack: recorded cancelled at
    the stop, rather than left running until the next command finds the process gone."""
    SLOW_STARTED.clear()
    async with Conveyor() as cv:
        run = await cv.submit(slow_chain)
        assert await asyncio.to_thread(SLOW_STARTED.wait, 30)
    async with await Services.open(home) as services:
        record = await services.runs.get_run(run.id)
        steps = {s.name: s for s in await services.runs.steps_of(run.id)}
    assert record.status is RunStatus.CANCELLED
    assert record.error == "its stack stopped before the run finished"
    # The running step finished within the workers' grace, or was stopped with the run.
    assert steps["slow_first"].status in (StepStatus.COMPLETED, StepStatus.CANCELLED)
    assert steps["then_this"].status is StepStatus.CANCELLED
    assert steps["then_this"].error == "its stack stopped before the run finished"
