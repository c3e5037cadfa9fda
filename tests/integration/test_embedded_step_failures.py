"""A step that fails on the embedded stack: what becomes of its run and of the steps
around it, retries, timeouts, and outputs that cannot be stored or read back (with the
opt-in that lets a pickled one through)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import numpy as np

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step

ATTEMPTS: dict[str, int] = {}
LOCK = threading.Lock()


@step
def boom(x: int) -> int:
    raise ValueError(f"bad value {x}")


@step
def after(x: int) -> int:
    return x


@step
def one() -> int:
    return 1


@step
def slow_branch() -> int:
    return 2


@pipeline
def partly_failing() -> None:
    after(after(boom(one())))
    after(slow_branch())


async def test_failure_skips_downstream_other_branches_finish() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(partly_failing)
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.FAILED
    assert "boom" in (record.error or "")
    assert steps["boom"].status is StepStatus.FAILED
    assert steps["boom"].error == "ValueError: bad value 1"
    assert "raise ValueError" in (steps["boom"].traceback or "")
    assert steps["after"].status is StepStatus.SKIPPED
    assert steps["after_2"].status is StepStatus.SKIPPED
    assert steps["slow_branch"].status is StepStatus.COMPLETED
    assert steps["after_3"].status is StepStatus.COMPLETED


@step(retries=2)
def flaky(key: str) -> str:
    with LOCK:
        ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
        attempt = ATTEMPTS[key]
    if attempt < 3:
        raise ConnectionError(f"attempt {attempt} failed")
    return f"ok after {attempt}"


@pipeline
def retrying(key: str) -> None:
    flaky(key=key)


async def test_retries_until_success_and_records_attempts() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(retrying, key="r1")
        record = await run.wait(timeout=30)
        (flaky_step,) = await run.steps()
        assert await run.load("flaky") == "ok after 3"
    assert record.status is RunStatus.COMPLETED
    assert flaky_step.status is StepStatus.COMPLETED
    assert flaky_step.attempt == 3
    assert flaky_step.error is None


@step(retries=1)
def always_fails() -> int:
    raise RuntimeError("never works")


@pipeline
def exhausting() -> None:
    always_fails()


async def test_retries_exhausted_fails_with_last_error() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(exhausting)
        record = await run.wait(timeout=30)
        (only,) = await run.steps()
    assert record.status is RunStatus.FAILED
    assert only.attempt == 2 and only.error == "RuntimeError: never works"


class Unstorable:
    pass


@step(retries=3)
def unstorable() -> Unstorable:
    return Unstorable()


@pipeline
def bad_output() -> None:
    unstorable()


async def test_non_serializable_output_fails_the_step_clearly_without_retry() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(bad_output)
        record = await run.wait(timeout=30)
        (only,) = await run.steps()
    assert record.status is RunStatus.FAILED
    assert only.attempt == 1, "a missing materializer is not worth retrying"
    assert "Unstorable" in (only.error or "")
    assert "allow_pickle=True" in (only.error or "")


@step(allow_pickle=True)
def pickled() -> Unstorable:
    return Unstorable()


@step(allow_pickle=True)
def unpickle(x: Unstorable) -> str:
    return type(x).__name__


@pipeline
def pickling() -> None:
    unpickle(pickled())


async def test_pickle_works_when_steps_opt_in() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(pickling)
        assert (await run.wait(timeout=30)).status is RunStatus.COMPLETED
        assert await run.load("unpickle") == "Unstorable"


@step
def weights() -> np.ndarray:
    return np.arange(5.0)


@step
def corrupt_store(_: np.ndarray) -> str:
    # Stands in for a disk fault: damage every stored artifact between two steps.
    root = Path(os.environ["CONVEYOR_HOME"]) / "artifacts"
    damaged = 0
    for path in root.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
            damaged += 1
    return f"damaged {damaged}"


@step(retries=2)
def use_weights(w: np.ndarray, note: str) -> float:
    return float(w.sum())


@pipeline
def corrupted() -> None:
    w = weights()
    use_weights(w, corrupt_store(w))


async def test_corrupted_artifact_fails_the_consumer_and_keeps_records() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(corrupted)
        record = await run.wait(timeout=30)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.FAILED
    assert steps["weights"].status is StepStatus.COMPLETED
    assert steps["weights"].outputs["output"].size > 0
    assert steps["corrupt_store"].status is StepStatus.COMPLETED
    failed = steps["use_weights"]
    assert failed.status is StepStatus.FAILED and failed.attempt == 1
    assert "corrupted" in (failed.error or "") and "blake3" in (failed.error or "")


@step(timeout=0.2)
async def sleepy() -> int:
    await asyncio.sleep(5)
    return 1


@pipeline
def too_slow() -> None:
    sleepy()


async def test_step_timeout_fails_the_step() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(too_slow)
        record = await run.wait(timeout=30)
        (only,) = await run.steps()
    assert record.status is RunStatus.FAILED
    assert "timed out after 0.2s" in (only.error or "")


@step
def raises_timeout() -> int:
    raise TimeoutError("the database did not answer")


@pipeline
def own_timeout() -> None:
    raises_timeout()


async def test_a_step_raising_timeout_error_is_not_mistaken_for_its_timeout() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(own_timeout)
        await run.wait(timeout=30)
        (only,) = await run.steps()
    assert only.error == "TimeoutError: the database did not answer"
    assert "raise TimeoutError" in (only.traceback or "")


UNSTORABLE_SCRIPT = """
from conveyor import pipeline, step

class Report:
    pass

@step
def report() -> Report:
    return Report()

@pipeline
def reporting() -> None:
    report()
"""


async def test_a_step_failure_names_the_users_file_not_a_generated_module(
    tmp_path: Path,
) -> None:
    script = tmp_path / "reports.py"
    script.write_text(UNSTORABLE_SCRIPT)
    async with Conveyor() as cv:
        run = await cv.submit(f"{script}:reporting")
        assert (await run.wait(timeout=30)).status is RunStatus.FAILED
        (only,) = await run.steps()
    assert f"is a {script}:Report, which no materializer can store" in (only.error or "")
    assert "conveyor_user_" not in (only.error or "")
