"""Large pipelines on the embedded stack: the step limit, and a fan-out of thousands that
completes with the right join while only a bounded number of its steps is queued at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts.limits import MAX_STEPS
from conveyor.service.pipelines import PipelineTooLarge
from conveyor.service.run_state import MAX_DISPATCHED
from conveyor.workers.broker_inprocess import InProcessBroker


@step
def root() -> int:
    return 1


@step
def times(x: int, i: int) -> int:
    return x * i


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def fan(n: int) -> None:
    one = root()
    total([times(one, i) for i in range(n)])


def test_a_pipeline_of_max_steps_compiles_and_one_step_more_is_refused() -> None:
    spec, _ = fan.compile(n=MAX_STEPS - 2)  # the root and the join besides
    assert len(spec.steps) == MAX_STEPS == 100_000
    with pytest.raises(PipelineTooLarge, match=f"more than {MAX_STEPS} steps"):
        fan.compile(n=MAX_STEPS - 1)


async def test_one_step_more_than_max_steps_is_refused_before_any_run(home: Path) -> None:
    async with Conveyor() as cv:
        with pytest.raises(PipelineTooLarge):
            await cv.submit(fan, n=MAX_STEPS - 1)


async def test_a_fan_out_of_5000_completes_with_a_bounded_queue(home: Path) -> None:
    n = 5_000
    deepest = 0
    async with Conveyor() as cv:
        broker = cv.broker
        assert isinstance(broker, InProcessBroker)
        queue = broker.topology.step_queue("default")
        run = await cv.submit(fan, n=n)
        waiting = asyncio.create_task(run.wait(timeout=300))
        while not waiting.done():
            deepest = max(deepest, broker.depth(queue))
            await asyncio.sleep(0.01)
        record = await waiting
        assert record.status is RunStatus.COMPLETED, record.error
        assert await run.load("total") == sum(range(n))
        steps = await run.steps()
        assert len(steps) == n + 2 and {s.status for s in steps} == {StepStatus.COMPLETED}
    assert 0 < deepest <= MAX_DISPATCHED
