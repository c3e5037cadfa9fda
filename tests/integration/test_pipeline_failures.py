"""Calling a pipeline that fails raises ``RunFailed`` with the run and the step's error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor import (
    Conveyor,
    ConveyorError,
    RunFailed,
    RunHandle,
    RunStatus,
    StepStatus,
    pipeline,
    step,
)


@step
def base() -> int:
    return 41


@step
def divide(x: int, by: int = 0) -> float:
    return x / by


@pipeline
def dividing(by: int = 0) -> None:
    divide(base(), by=by)


def test_a_failing_pipeline_call_raises_with_the_run_and_the_failing_step() -> None:
    with pytest.raises(RunFailed) as raised:
        dividing()
    failure = raised.value
    assert isinstance(failure, ConveyorError)
    assert failure.status is RunStatus.FAILED
    assert failure.step == "divide"
    assert failure.step_error == "ZeroDivisionError: division by zero"
    assert "return x / by" in (failure.step_traceback or "")
    handle = failure.run
    assert isinstance(handle, RunHandle) and handle.id == failure.run_id
    assert handle.step_statuses == {"base": StepStatus.COMPLETED, "divide": StepStatus.FAILED}
    assert handle.load("base") == 41  # what finished can still be read
    message = str(failure)
    assert f"run {failure.run_id} of pipeline 'dividing' failed" in message
    assert "step 'divide' failed: ZeroDivisionError: division by zero" in message


def test_raise_on_failure_false_returns_the_handle_of_the_failed_run() -> None:
    handle = dividing.with_options(raise_on_failure=False)()
    assert handle.status is RunStatus.FAILED
    assert handle.steps["divide"].error == "ZeroDivisionError: division by zero"
    # The option makes a new definition: the pipeline itself still raises.
    with pytest.raises(RunFailed):
        dividing()
    assert dividing.with_options(raise_on_failure=False)(by=2).load("divide") == 20.5


async def test_async_wait_raises_only_when_asked() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(dividing)
        assert (await run.wait(timeout=30)).status is RunStatus.FAILED
        again = await cv.submit(dividing)
        with pytest.raises(RunFailed) as raised:
            await again.wait(timeout=30, raise_on_failure=True)
        assert raised.value.run is again and raised.value.step == "divide"
        fine = await cv.submit(dividing, by=1)
        record = await fine.wait(timeout=30, raise_on_failure=True)
        assert record.status is RunStatus.COMPLETED


def test_a_script_whose_pipeline_fails_exits_1_showing_the_steps_own_code(
    tmp_path: Path,
) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            from conveyor import pipeline, step

            def check(rows):
                raise ValueError(f"only {len(rows)} rows")

            @step
            def load() -> list[int]:
                rows = [1, 2]
                check(rows)
                return rows

            @pipeline
            def training():
                load()

            run = training()
            print("not reached", run.status)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stdout
    assert "not reached" not in result.stdout
    err = result.stderr
    assert "RunFailed: run " in err and "step 'load' failed: ValueError: only 2 rows" in err
    assert f'File "{script}", line 10, in load' in err
    assert 'line 5, in check\n    raise ValueError(f"only {len(rows)} rows")' in err
