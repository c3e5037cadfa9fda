"""Chain riders on the embedded stack: a rider's events heard before its parent's outcome
must not take the controller's prefetch (an outcome is held unacked, one per attempt; a
StepStarted or heartbeat is dropped)."""

from __future__ import annotations

import asyncio
import time

import pytest

from conveyor import Conveyor, RunStatus, pipeline, step
from conveyor.contracts import StepHeartbeat, StepStatus, WorkerFacts
from conveyor.service import controller


@step
def slow_parent() -> int:
    time.sleep(1.5)
    return 1


@step
def quick_rider(x: int) -> int:
    return x + 1


@pipeline
def slow_parent_and_rider() -> None:
    quick_rider(slow_parent())


async def test_early_heartbeats_of_a_rider_do_not_starve_the_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # quick_rider rides on slow_parent at attempt 1. While slow_parent runs, heartbeats of
    # quick_rider's attempt 1 arrive: a stale forward's execution heartbeating every 10 s
    # for hours (4096 heartbeats is 11 h; less with several runs), or any worker that can
    # publish to the events exchange. Each one is early: held, unacked. Once as many are
    # held as the controller's prefetch (4096 in production, 16 here), the broker delivers
    # nothing more on the events queue: slow_parent's StepSucceeded is never heard (nor
    # any heartbeat of any run of the stack, whose leases then all lapse), and the held
    # heartbeats wait for that outcome.
    monkeypatch.setattr(controller, "INBOX_PREFETCH", 16)
    async with Conveyor() as cv:
        run = await cv.submit(slow_parent_and_rider, cache=False)
        for _ in range(100):
            steps = {s.name: s for s in await run.steps()}
            if steps["slow_parent"].status is StepStatus.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert steps["quick_rider"].attempt == 1  # it rides
        by = WorkerFacts(worker="stale-worker", pid=1)
        beats = [
            StepHeartbeat(run_id=run.id, step="quick_rider", attempt=1, by=by) for _ in range(16)
        ]
        await cv.broker.publish(beats)
        try:
            record = await run.wait(timeout=10)
        except TimeoutError:
            steps = {s.name: (s.status.value, s.attempt) for s in await run.steps()}
            raise AssertionError(f"the controller hears nothing more: {steps}") from None
    assert record.status is RunStatus.COMPLETED
