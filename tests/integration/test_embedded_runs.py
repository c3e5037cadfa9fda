"""Runs on the embedded default stack, end to end through events and the artifact store:
outputs handed on through the store, runs and pools side by side, step logs and followers,
parameters and stacks checked before a run starts. Failing steps are in
``test_embedded_step_failures``; cancelled runs and stopping stacks in
``test_embedded_cancellation``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import (
    ComponentType,
    NotFoundError,
)
from conveyor.service.context import Services
from conveyor.service.pipeline_parameters import ParameterError

SEEN: dict[str, Any] = {}


@step
def produce() -> dict[str, list[int]]:
    value = {"numbers": [1, 2, 3]}
    SEEN["produced"] = value
    return value


@step
def consume(data: dict[str, list[int]]) -> int:
    SEEN["consumed"] = data
    return sum(data["numbers"])


@pipeline
def handoff() -> None:
    consume(produce())


async def test_output_is_a_file_in_the_store_and_next_step_loads_it(home: Path) -> None:
    async with Conveyor() as cv:
        run = await cv.submit(handoff)
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
        assert record.status is RunStatus.COMPLETED
        ref = steps["produce"].outputs["output"]
        path = Path(cv.artifacts.path_of(ref.uri))
        assert path.is_file() and path.is_relative_to(home / "artifacts")
        assert path.read_bytes() == b'{"numbers":[1,2,3]}'
        assert await run.load("consume") == 6
    assert SEEN["consumed"] == SEEN["produced"]
    assert SEEN["consumed"] is not SEEN["produced"]


@step
async def tick(label: str, i: int) -> str:
    await asyncio.sleep(0.05)
    return f"{label}{i}"


@step
def gather(parts: list[str]) -> str:
    return ",".join(parts)


@pipeline
def ticking(label: str, n: int = 6) -> None:
    gather([tick(label, i) for i in range(n)])


async def test_two_concurrent_runs_complete_with_steps_interleaved() -> None:
    async with Conveyor() as cv:
        first, second = await cv.submit(ticking, "a"), await cv.submit(ticking, "b")
        records = await asyncio.gather(first.wait(timeout=60), second.wait(timeout=60))
        assert [r.status for r in records] == [RunStatus.COMPLETED, RunStatus.COMPLETED]
        assert await first.load("gather") == "a0,a1,a2,a3,a4,a5"
        assert await second.load("gather") == "b0,b1,b2,b3,b4,b5"
        a_steps = [s for s in await first.steps() if s.name.startswith("tick")]
        b_steps = [s for s in await second.steps() if s.name.startswith("tick")]
    a_start = min(s.started for s in a_steps if s.started)
    a_end = max(s.finished for s in a_steps if s.finished)
    b_start = min(s.started for s in b_steps if s.started)
    b_end = max(s.finished for s in b_steps if s.finished)
    assert b_start < a_end and a_start < b_end, "the two runs' steps did not overlap in time"


async def test_unknown_stack_is_a_clear_error_and_changes_nothing(home: Path) -> None:
    with pytest.raises(
        NotFoundError, match=r"no stack named 'defualt' \(did you mean: default\?\)"
    ):
        async with Conveyor(stack="defualt"):
            pass
    async with Conveyor() as cv:
        run = await cv.submit(handoff)
        await run.wait(timeout=30)
    with pytest.raises(NotFoundError):
        async with Conveyor(stack="nope"):
            pass
    services = await Services.open(home)
    try:
        runs = await services.runs.list_runs()
        assert [r.status for r in runs] == [RunStatus.COMPLETED]
    finally:
        await services.close()


def test_calling_a_pipeline_runs_it_and_returns_a_handle() -> None:
    handle = handoff()
    assert handle.status is RunStatus.COMPLETED
    assert handle.step_statuses == {
        "produce": StepStatus.COMPLETED,
        "consume": StepStatus.COMPLETED,
    }
    assert handle.load("consume") == 6
    assert handle.load("produce") == {"numbers": [1, 2, 3]}


@step
def sync_talker(i: int) -> int:
    for line in range(20):
        print(f"sync-{i} line {line}")
        time.sleep(0.001)
    return i


@step
async def async_talker(i: int) -> int:
    for line in range(20):
        print(f"async-{i} line {line}")
        await asyncio.sleep(0.001)
    return i


@pipeline
def talkers() -> None:
    gather_ints([sync_talker(i) for i in range(3)] + [async_talker(i) for i in range(3)])


@step
def gather_ints(xs: list[int]) -> int:
    return sum(xs)


async def test_each_step_keeps_only_what_it_printed_itself() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(talkers)
        assert (await run.wait(timeout=60)).status is RunStatus.COMPLETED
        steps = {s.name: s for s in await run.steps()}
        texts = {}
        for name, record in steps.items():
            if record.logs is not None:
                texts[name] = cv.artifacts.get(
                    record.logs.uri, record.logs.digest, lambda p: Path(p).read_text()
                )
    assert set(texts) == {n for n in steps if "talker" in n}
    for name, text in texts.items():
        lines = text.splitlines()
        assert len(lines) == 20, (name, lines)
        assert len({line.split(" line ")[0] for line in lines}) == 1, (name, lines)
    assert steps["gather_ints"].logs is None, "a step that prints nothing keeps no log"


@step
async def slow_after(x: int) -> int:
    await asyncio.sleep(1.0)
    return x


@pipeline
def quick_then_slow() -> None:
    slow_after(produce_number())


@step
def produce_number() -> int:
    return 1


async def test_followers_hear_every_change_in_order_while_a_step_still_runs() -> None:
    # Status changes are released at most every 0.2 s: a change made just after a release
    # must still reach followers while nothing else happens, not only when the run ends.
    heard: list[tuple[float, str, StepStatus]] = []
    async with Conveyor() as cv:
        started = time.monotonic()
        run = await cv.submit(
            quick_then_slow,
            on_step=lambda c: heard.append((time.monotonic() - started, c.step, c.status)),
        )
        await run.wait(timeout=30)
    # A step as short as produce_number is announced only if it takes announce_after_s.
    quick_start = ("produce_number", StepStatus.RUNNING)
    order = [(step, status) for _, step, status in heard if (step, status) != quick_start]
    assert order == [
        ("produce_number", StepStatus.COMPLETED),
        ("slow_after", StepStatus.RUNNING),
        ("slow_after", StepStatus.COMPLETED),
    ], order
    running_at = next(t for t, step, s in heard if (step, s) == ("slow_after", StepStatus.RUNNING))
    assert running_at < 0.8, f"'running' reached the follower only after {running_at:.2f}s"


@step(pool="gpu")
def on_gpu() -> int:
    return 20


@step(pool="big-memory")
def on_big_memory(x: int) -> int:
    return x + 1


@pipeline
def across_pools() -> None:
    on_big_memory(on_gpu())


async def test_the_embedded_stack_runs_the_steps_of_every_pool() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(across_pools)
        record = await run.wait(timeout=30)
        assert record.status is RunStatus.COMPLETED
        assert await run.load("on_big_memory") == 21


RUNNING_NOW: list[int] = [0, 0]
"""Steps of ``in_three_pools`` running now, and the most seen at once."""


async def _count_while_running(i: int) -> int:
    RUNNING_NOW[0] += 1
    RUNNING_NOW[1] = max(RUNNING_NOW)
    await asyncio.sleep(0.1)
    RUNNING_NOW[0] -= 1
    return i


@step(pool="a")
async def in_a(i: int) -> int:
    return await _count_while_running(i)


@step(pool="b")
async def in_b(i: int) -> int:
    return await _count_while_running(i)


@pipeline
def in_three_pools() -> None:
    gather_ints([in_a(0), in_b(1), in_a(2), in_b(3)])


async def test_the_embedded_worker_runs_no_more_steps_at_once_than_its_concurrency(
    home: Path,
) -> None:
    services = await Services.open(home)
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "one-at-a-time", "local", {"concurrency": 1}
        )
        await services.stacks.register_stack(
            "narrow",
            {ComponentType.ORCHESTRATOR: "one-at-a-time", ComponentType.ARTIFACT_STORE: "default"},
        )
    finally:
        await services.close()
    async with Conveyor(stack="narrow") as cv:
        run = await cv.submit(in_three_pools)
        assert (await run.wait(timeout=30)).status is RunStatus.COMPLETED
        assert await run.load("gather_ints") == 6
    assert RUNNING_NOW[1] == 1, "two pools' steps ran at once on a worker of concurrency 1"


@pipeline
def sized(n: int = 3) -> None:
    consume(produce())


async def test_submit_refuses_parameters_that_do_not_fit_before_any_run() -> None:
    async with Conveyor() as cv:
        with pytest.raises(ParameterError, match="parameter 'n' expects int, got 'many'"):
            await cv.submit(sized, n="many")
        with pytest.raises(ParameterError, match=r"no parameter 'size' \(its parameters: n\)"):
            await cv.submit(sized, size=3)
        assert await cv.services.runs.list_runs() == []
