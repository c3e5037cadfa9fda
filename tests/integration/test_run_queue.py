"""The embedded stack's run queue (``max_active_runs``): runs submitted beyond it wait,
queued and visible as such, start in the order they were submitted as others end, can be
cancelled before they start, and end, never started, with the stack or process that
queued them."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import ComponentType, NotFoundError
from conveyor.service.context import Services
from tests.conftest import conveyor_cli

GATE = threading.Event()
STARTED: list[str] = []


@step
def hold(tag: str) -> str:
    STARTED.append(tag)
    if not GATE.wait(30):
        raise RuntimeError("the test never let the step end")
    return tag


@pipeline
def held(tag: str) -> None:
    hold(tag)


async def _queue_stack(home: Path, concurrency: int, max_active_runs: int) -> None:
    config = {"concurrency": concurrency, "max_active_runs": max_active_runs}
    services = await Services.open(home)
    try:
        await services.stacks.register_component(ComponentType.ORCHESTRATOR, "q", "local", config)
        await services.stacks.register_stack(
            "queued", {ComponentType.ORCHESTRATOR: "q", ComponentType.ARTIFACT_STORE: "default"}
        )
    finally:
        await services.close()


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_runs_beyond_the_limit_wait_queued_and_start_in_the_order_submitted(
    home: Path,
) -> None:
    await _queue_stack(home, concurrency=1, max_active_runs=2)
    GATE.clear()
    STARTED.clear()
    async with Conveyor(stack="queued") as cv:
        runs = [await cv.submit(held, tag=f"r{i}", cache=False) for i in range(5)]
        await _until(lambda: STARTED == ["r0"], "the first run's step never started")
        seen = [(await cv.services.runs.get_run(run.id)).status for run in runs]
        # Without the limit all five would be recorded and started (pending or running).
        assert seen[2:] == [RunStatus.QUEUED] * 3, seen
        assert RunStatus.QUEUED not in seen[:2], seen
        assert (await runs[3].record()).status is RunStatus.QUEUED
        assert {s.status for s in await runs[3].steps()} == {StepStatus.PENDING}

        # A request with a key that a queued run has is answered with that run.
        keyed = await cv.submit(held, tag="k", cache=False, idempotency_key="k1")
        await _until_status(cv.services, [keyed.id], RunStatus.QUEUED)
        again = await cv.submit(held, tag="k", cache=False, idempotency_key="k1")
        assert again.id == keyed.id
        await cv.cancel(keyed.id)
        assert (await keyed.wait(timeout=30)).status is RunStatus.CANCELLED

        await cv.cancel(runs[3].id)
        cancelled = await runs[3].wait(timeout=30)
        assert cancelled.status is RunStatus.CANCELLED
        assert STARTED == ["r0"], "a run started beyond the limit"

        GATE.set()
        records = [await run.wait(timeout=60) for run in runs]
    ended = [r.status for r in records]
    assert ended == [RunStatus.COMPLETED] * 3 + [RunStatus.CANCELLED, RunStatus.COMPLETED]
    assert STARTED == ["r0", "r1", "r2", "r4"], "not in the order submitted"
    began = [r.started for r in records if r.status is RunStatus.COMPLETED]
    assert began == sorted(began)  # type: ignore[type-var]


async def test_runs_still_queued_when_the_stack_stops_end_cancelled_unstarted(home: Path) -> None:
    await _queue_stack(home, concurrency=1, max_active_runs=1)
    GATE.clear()
    STARTED.clear()
    async with Conveyor(stack="queued") as cv:
        runs = [await cv.submit(held, tag=f"s{i}", cache=False) for i in range(4)]
        await _until(lambda: STARTED == ["s0"], "the first run's step never started")
        await _until_status(cv.services, [run.id for run in runs[1:]], RunStatus.QUEUED)
        GATE.set()  # the first step ends while the stack stops; the others never start
    async with await Services.open(home) as services:
        seen = {run.id: run for run in await services.runs.list_runs()}
        steps = [await services.runs.steps_of(run.id) for run in runs[2:]]
    # The first run ended, or was still going when the stack stopped; the second may have
    # started as it ended (recorded cancelled then, its step never run).
    assert seen[runs[0].id].status in (RunStatus.COMPLETED, RunStatus.CANCELLED)
    assert seen[runs[1].id].status is RunStatus.CANCELLED
    # The others' requests went with the process's in-process broker: shown queued, they
    # would wait for ever. They are listed as runs that ended before they started.
    for run, its_steps in zip(runs[2:], steps, strict=True):
        record = seen[run.id]
        assert record.status is RunStatus.CANCELLED and record.started is None
        assert record.error == "its stack stopped before the run started"
        assert [(s.name, s.status, s.attempt) for s in its_steps] == [
            ("hold", StepStatus.CANCELLED, 0)
        ]
    assert STARTED == ["s0"]
    described = conveyor_cli("run", "describe", runs[3].id)
    assert described.returncode == 0, described.stderr
    assert "cancelled, never started" in described.stdout
    assert "COMPONENT_TYPE" not in described.stdout  # it ran on no stack


QUEUING_PROCESS = """
import asyncio, pathlib, sys, threading
from conveyor import Conveyor, pipeline, step

@step
def forever() -> int:
    threading.Event().wait()
    return 0

@pipeline
def stuck() -> None:
    forever()

async def main() -> None:
    async with Conveyor(stack="queued") as cv:
        ids = [(await cv.submit(stuck, cache=False)).id for _ in range(3)]
        pathlib.Path(sys.argv[1]).write_text(" ".join(ids))
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_the_runs_a_killed_process_queued_fail_unstarted_as_its_runs_fail(
    home: Path, tmp_path: Path
) -> None:
    await _queue_stack(home, concurrency=1, max_active_runs=1)
    script = tmp_path / "queuing.py"
    script.write_text(textwrap.dedent(QUEUING_PROCESS))
    submitted = tmp_path / "submitted"
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(submitted))
    try:
        await _until(submitted.exists, "the process never submitted its runs")
        first, *queued = submitted.read_text().split()
        async with await Services.open(home) as services:
            await _until_status(services, queued, RunStatus.QUEUED)
            # Another process sees them queued: the process that queued them lives.
            assert (await services.runs.get_run(first)).status is RunStatus.RUNNING
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    async with await Services.open(home) as services:  # what every command opens
        assert (await services.runs.get_run(first)).status is RunStatus.FAILED
        records = [await services.runs.get_run(run_id) for run_id in queued]
        steps = [await services.runs.steps_of(run_id) for run_id in queued]
        # Done once: the next command finds nothing more to fail.
        assert await services.fail_dead_runs() == []
    pid = proc.pid
    for record, its_steps in zip(records, steps, strict=True):
        assert record.status is RunStatus.FAILED and record.started is None
        assert record.error == f"the process that queued it (pid {pid}) died before the run started"
        assert [(s.name, s.status) for s in its_steps] == [("forever", StepStatus.SKIPPED)]


async def _until_status(services: Services, run_ids: list[str], status: RunStatus) -> None:
    deadline = time.monotonic() + 30
    while True:
        seen = [await _status(services, run_id) for run_id in run_ids]
        if seen == [status] * len(run_ids):
            return
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)


async def _status(services: Services, run_id: str) -> RunStatus | None:
    """None until its controller took the request (it then shows, queued or started)."""
    try:
        return (await services.runs.get_run(run_id)).status
    except NotFoundError:
        return None
