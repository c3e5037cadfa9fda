"""A timed-out or cancelled sync step frees its slot: the worker keeps running steps.

Sync bodies that never return (a hung client, a dead lock) are held on a threading.Event
that the test releases at its end, so no thread outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import StepFailed, StepReady, StepSpec, StepSucceeded, WorkerFacts
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.artifact_store_s3 import S3ArtifactStore
from conveyor.workers.execution import StepExecutor, load_artifact
from conveyor.workers.s3_config import S3ArtifactStoreConfig
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import StepDefinition
from tests.s3_support import S3Bucket

HUNG = threading.Event()
"""Set at the end of each test: the bodies that hang return then."""

EMBEDDED_CONCURRENCY = 4  # the default stack's


@pytest.fixture(autouse=True)
def _release_hung_bodies() -> Iterator[None]:
    HUNG.clear()
    yield
    HUNG.set()


@step(timeout=0.3)
def hangs(i: int) -> int:
    HUNG.wait(120)
    return i


@step
def quick(i: int) -> int:
    return i * 10


@pipeline
def many_hang(hung: int, quick_ones: int) -> None:
    for i in range(hung):
        hangs(i)
    for i in range(quick_ones):
        quick(i)


@pipeline
def one_quick() -> None:
    quick(7)


async def test_an_embedded_run_with_more_hung_sync_steps_than_the_concurrency_finishes() -> None:
    hung = EMBEDDED_CONCURRENCY + 2
    async with Conveyor() as cv:
        run = await cv.submit(many_hang, hung=hung, quick_ones=3)
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.FAILED
    hung_steps = [s for name, s in steps.items() if name.startswith("hangs")]
    quick_steps = [s for name, s in steps.items() if name.startswith("quick")]
    assert len(hung_steps) == hung and len(quick_steps) == 3
    for s in hung_steps:
        assert s.status is StepStatus.FAILED
        assert s.error == "TimeoutError: step timed out after 0.3s", s.error
    assert {s.status for s in quick_steps} == {StepStatus.COMPLETED}


async def test_after_more_timeouts_than_the_concurrency_the_worker_still_runs_steps() -> None:
    async with Conveyor() as cv:
        first = await cv.submit(many_hang, hung=EMBEDDED_CONCURRENCY + 1, quick_ones=0)
        assert (await first.wait(timeout=30)).status is RunStatus.FAILED
        second = await cv.submit(one_quick)
        # Before: every slot held by a hung thread; the step waited for one until it timed
        # out, or for ever without a timeout.
        record = await second.wait(timeout=30)
        assert record.status is RunStatus.COMPLETED, await second.steps()
        assert await second.load("quick") == 70


def ready_of(definition: StepDefinition, **parameters: object) -> StepReady:
    """A StepReady of ``definition`` as the controller would send it."""
    spec = StepSpec(
        name=definition.name,
        ref=definition.ref,
        parameters=parameters,
        outputs=definition.outputs,
        timeout_s=definition.timeout,
        isolation=definition.isolation,
    )
    return StepReady(run_id="r" * 32, step=spec, attempt=1)


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[StepExecutor]:
    """An executor of one step at a time, which resolves the steps of this module."""
    store = LocalArtifactStore(tmp_path / "artifacts")
    resolver = StepResolver(store, in_process=True)
    steps = (hangs, quick, sleeps_in_a_process, pid_in_a_process, ignores_sigterm)
    resolver.add({d.ref: d for d in steps})
    executor = StepExecutor(store, resolver, WorkerFacts(worker="test", pid=0), concurrency=1)
    yield executor
    executor.close()


async def test_cancelling_a_hung_sync_step_frees_its_slot_at_once(executor: StepExecutor) -> None:
    # No timeout: only the cancellation (as `run cancel` does) stops the attempt.
    task = asyncio.create_task(executor.execute(ready_of(hangs, i=1)))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert executor.stuck_threads == 1 and executor.healthy is False
    # With a single slot (concurrency 1), the next step still runs.
    outcome = await asyncio.wait_for(executor.execute(ready_of(quick, i=2)), 10)
    assert isinstance(outcome, StepSucceeded), outcome
    HUNG.set()
    for _ in range(200):
        if executor.stuck_threads == 0:
            break
        await asyncio.sleep(0.05)
    assert executor.stuck_threads == 0 and executor.healthy


# --- isolation="process": the body in a child process, killed at the timeout ---


def pid_gone(pid: int) -> bool:
    """Whether no process (not even a zombie: it was reaped) has ``pid``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def pids_in(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("pid-*")) if p.read_text()]


@step(timeout=0.5, isolation="process")
def sleeps_in_a_process(pid_file: str) -> int:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)
    return 1


@step(isolation="process")
def pid_in_a_process() -> int:
    return os.getpid()


@pipeline
def sleepers(folder: str, count: int) -> None:
    for i in range(count):
        sleeps_in_a_process(f"{folder}/pid-{i}")


@pipeline
def one_in_a_process() -> None:
    pid_in_a_process()


async def test_a_process_step_past_its_timeout_is_killed_and_its_slot_serves_the_next(
    tmp_path: Path,
) -> None:
    async with Conveyor() as cv:
        run = await cv.submit(sleepers, folder=str(tmp_path), count=EMBEDDED_CONCURRENCY + 1)
        assert (await run.wait(timeout=60)).status is RunStatus.FAILED
        steps = await run.steps()
        assert {s.error for s in steps} == {"TimeoutError: step timed out after 0.5s"}
        pids = pids_in(tmp_path)
        assert len(pids) == EMBEDDED_CONCURRENCY + 1 and os.getpid() not in pids
        assert all(pid_gone(pid) for pid in pids), pids
        after = await cv.submit(one_in_a_process)
        assert (await after.wait(timeout=30)).status is RunStatus.COMPLETED
        assert await after.load("pid_in_a_process") not in (os.getpid(), *pids)


DEATHS = ("exit", "sigkill", "sys.exit", "raise")


@step(isolation="process")
def dies(how: str) -> int:
    print("about to die", flush=False)
    if how == "exit":
        os._exit(3)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sys.exit":
        sys.exit(5)
    raise ValueError("no such death")


@pipeline
def deaths() -> None:
    for how in DEATHS:
        dies(how)


async def test_a_process_step_that_dies_fails_saying_how_and_the_worker_goes_on() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(deaths)
        assert (await run.wait(timeout=60)).status is RunStatus.FAILED
        # Invocations are named dies, dies_2, ... in call order.
        steps = {DEATHS[int(s.name.partition("_")[2] or 1) - 1]: s for s in await run.steps()}
        logs = {
            name: cv.artifacts.get(s.logs.uri, s.logs.digest, lambda p: Path(p).read_text())
            for name, s in steps.items()
            if s.logs is not None
        }
        assert steps["sigkill"].error == (
            "the step's process was killed by signal 9 (SIGKILL): out of memory? "
            "(the kernel's OOM killer sends SIGKILL)"
        )
        assert steps["exit"].error == (
            "the step's process exited with status 3 before its body returned "
            "(os._exit, or a crash)"
        )
        assert steps["sys.exit"].error == "SystemExit: 5"
        assert steps["raise"].error == "ValueError: no such death"
        assert 'raise ValueError("no such death")' in (steps["raise"].traceback or "")
        # Printed line by line: what a killed process printed is kept too.
        assert logs == {name: "about to die\n" for name in steps}
        after = await cv.submit(one_in_a_process)
        assert (await after.wait(timeout=30)).status is RunStatus.COMPLETED


@step(isolation="process")
def makes_data(n: int) -> tuple[dict[str, int], np.ndarray]:
    print("made in", os.getpid())
    logging.getLogger("user.step").warning("a warning from the child")
    return {"n": n}, np.arange(n * 3, dtype=np.float64).reshape(n, 3)


@step
def uses_data(meta: dict[str, int], array: np.ndarray) -> float:
    assert array.shape == (meta["n"], 3)
    return float(array.sum())


@pipeline
def data_from_a_process(n: int) -> None:
    meta, array = makes_data(n)
    uses_data(meta, array)


async def test_outputs_and_prints_of_a_process_step_reach_the_store_and_its_logs() -> None:
    n = 200_000  # a 4.8 MB array: written to a file, moved into the store
    async with Conveyor() as cv:
        run = await cv.submit(data_from_a_process, n=n)
        assert (await run.wait(timeout=60)).status is RunStatus.COMPLETED, await run.steps()
        assert await run.load("uses_data") == float(np.arange(n * 3).sum())
        assert await run.load("makes_data", "output_0") == {"n": n}
        array = await run.load("makes_data", "output_1")
        assert isinstance(array, np.ndarray) and array.shape == (n, 3)
        steps = {s.name: s for s in await run.steps()}
        record = steps["makes_data"]
        assert record.logs is not None
        text = cv.artifacts.get(record.logs.uri, record.logs.digest, lambda p: Path(p).read_text())
    printed_pid = int(text.split("made in ")[1].split()[0])
    assert printed_pid != os.getpid() and pid_gone(printed_pid)
    assert "a warning from the child" in text


@pytest.mark.parametrize("waiter", ["pidfd", "thread"])
async def test_cancelling_a_process_step_kills_its_process_and_the_next_one_runs(
    waiter: str, executor: StepExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if waiter == "thread":  # as where there are no pidfds (macOS, old kernels)
        monkeypatch.delattr(os, "pidfd_open")
    pid_file = tmp_path / "pid"
    ready = ready_of(sleeps_in_a_process, pid_file=str(pid_file))
    task = asyncio.create_task(executor.execute(ready))
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    assert not pid_gone(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert pid_gone(pid) and executor.stuck_threads == 0
    outcome = await asyncio.wait_for(executor.execute(ready_of(pid_in_a_process)), 10)
    assert isinstance(outcome, StepSucceeded), outcome


@step(timeout=0.5, isolation="process")
def ignores_sigterm(pid_file: str) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(60)
    return 1


async def test_a_process_step_that_ignores_sigterm_gets_sigkill(
    executor: StepExecutor, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    ready = ready_of(ignores_sigterm, pid_file=str(pid_file))
    outcome = await asyncio.wait_for(executor.execute(ready, timeout=0.5), 30)
    assert isinstance(outcome, StepFailed)
    assert outcome.error == "TimeoutError: step timed out after 0.5s"
    assert pid_gone(int(pid_file.read_text()))


async def test_the_worker_default_isolation_applies_unless_the_step_says(
    tmp_path: Path,
) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    resolver = StepResolver(store, in_process=True)
    resolver.add({d.ref: d for d in (pid_of_default, pid_in_a_thread)})
    facts = WorkerFacts(worker="test", pid=0)
    executor = StepExecutor(store, resolver, facts, concurrency=1, isolation="process")
    try:
        pids = {}
        for definition in (pid_in_a_thread, pid_of_default):
            outcome = await executor.execute(ready_of(definition))
            assert isinstance(outcome, StepSucceeded), outcome
            pids[definition.name] = load_artifact(
                store, outcome.outputs["output"], allow_pickle=False
            )
    finally:
        executor.close()
    assert pids["pid_in_a_thread"] == os.getpid()
    assert pids["pid_of_default"] != os.getpid()


@step(isolation="thread")
def pid_in_a_thread() -> int:
    return os.getpid()


@step
def pid_of_default() -> int:
    return os.getpid()


def test_isolation_is_checked_where_the_step_is_declared() -> None:
    with pytest.raises(ValueError, match="isolation must be 'thread' or 'process'"):
        step(isolation="fork")(lambda: 1)  # type: ignore[call-overload]

    async def body() -> int:
        return 1

    with pytest.raises(ValueError, match="async step"):
        step(isolation="process")(body)


async def test_a_process_step_on_an_s3_store_hands_its_outputs_to_the_worker(
    s3_bucket: S3Bucket,
) -> None:
    # The worker's S3 client is in use before the fork; only the worker uses it after.
    store = S3ArtifactStore(S3ArtifactStoreConfig(**s3_bucket.config()))
    store.check()
    resolver = StepResolver(store, in_process=True)
    resolver.add({makes_data.ref: makes_data})
    executor = StepExecutor(store, resolver, WorkerFacts(worker="test", pid=0), concurrency=1)
    try:
        outcome = await executor.execute(ready_of(makes_data, n=1000))
    finally:
        executor.close()
    assert isinstance(outcome, StepSucceeded), outcome
    meta = load_artifact(store, outcome.outputs["output_0"], allow_pickle=False)
    array = load_artifact(store, outcome.outputs["output_1"], allow_pickle=False)
    assert meta == {"n": 1000}
    assert np.array_equal(array, np.arange(3000, dtype=np.float64).reshape(1000, 3))
    assert outcome.logs is not None
    assert b"made in" in store.get_bytes(outcome.logs.uri, outcome.logs.digest)


EMBEDDING_PROGRAM = """
import asyncio, os, sys, time
from conveyor import Conveyor, pipeline, step

@step(isolation="process")
def sleeps(pid_file: str) -> int:
    with open(pid_file, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(120)
    return 1

@pipeline
def held(pid_file: str) -> None:
    sleeps(pid_file)

async def main() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(held, pid_file=sys.argv[1])
        await run.wait()

asyncio.run(main())
"""


def test_a_worker_killed_with_sigkill_leaves_no_step_process_behind(tmp_path: Path) -> None:
    program, pid_file = tmp_path / "program.py", tmp_path / "pid"
    program.write_text(EMBEDDING_PROGRAM)
    worker = subprocess.Popen([sys.executable, str(program), str(pid_file)], cwd=tmp_path)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert worker.poll() is None and time.monotonic() < deadline, "no step started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        worker.kill()
        worker.wait(30)
        deadline = time.monotonic() + 30
        while not pid_gone(child):  # reparented to init, which reaps it once it died
            assert time.monotonic() < deadline, f"step process {child} outlived its worker"
            time.sleep(0.05)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
        if child is not None and not pid_gone(child):
            os.kill(child, signal.SIGKILL)
