"""Runs submitted together on the embedded stack: the first submitted gets its steps first,
so it finishes early instead of all runs finishing together at the end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conveyor import Conveyor, RunStatus, pipeline, step
from conveyor.contracts import ComponentType
from conveyor.service.context import Services

TRACE: list[tuple[str, int]] = []
"""(run tag, link) in the order the links started."""
LINKS = 3


@step
async def link(tag: str, i: int, previous: int) -> int:
    TRACE.append((tag, i))
    await asyncio.sleep(0.05)  # long beside the controller's turn between two steps
    return previous + 1


@pipeline
def tagged_chain(tag: str) -> None:
    value = link(tag, 0, 0)
    for i in range(1, LINKS):
        value = link(tag, i, value)


async def _one_at_a_time_stack(home: Path) -> None:
    services = await Services.open(home)
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "serial", "local", {"concurrency": 1}
        )
        await services.stacks.register_stack(
            "serial",
            {ComponentType.ORCHESTRATOR: "serial", ComponentType.ARTIFACT_STORE: "default"},
        )
    finally:
        await services.close()


async def test_the_run_submitted_first_finishes_first(home: Path) -> None:
    await _one_at_a_time_stack(home)
    TRACE.clear()
    tags = ["r0", "r1", "r2", "r3"]
    async with Conveyor(stack="serial") as cv:
        runs = [await cv.submit(tagged_chain, tag=tag) for tag in tags]
        records = [await run.wait(timeout=60) for run in runs]
    assert all(r.status is RunStatus.COMPLETED for r in records)
    assert sorted(TRACE) == sorted((t, i) for t in tags for i in range(LINKS))
    # FIFO queues would start every run's first link before any second link, and finish
    # them all at the end; earlier runs first finishes r0 before r3 even starts.
    assert TRACE.index(("r0", LINKS - 1)) < TRACE.index(("r3", 0)), TRACE
    for tag in tags:  # each run's links in order
        assert [i for t, i in TRACE if t == tag] == list(range(LINKS))
    finished = [r.finished for r in records]
    assert all(f is not None for f in finished)
    assert finished == sorted(finished), "runs did not finish in the order they were submitted"
