"""A failed step's traceback, from the worker to ``run describe``, ``run logs`` and the API:
it starts at the user's code whatever the step's isolation, and it is bounded."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from conveyor import Client, Conveyor, RunStatus, pipeline, step
from conveyor.contracts.events import MAX_STEP_ERROR_LENGTH, MAX_TRACEBACK_LENGTH
from tests.conftest import conveyor_cli
from tests.integration.api_helpers import serving
from tests.integration.rabbitmq_support import (
    Processes,
    only_run,
    processes,
    register_stack,
    vhost,
)

__all__ = ["processes", "vhost"]  # fixtures

WORKERS_DIR = str(Path(__file__).parents[2] / "workers")


def check_rows(rows: list[int]) -> None:
    raise ValueError(f"{len(rows)} rows is too few")


@step
def in_a_thread() -> int:
    check_rows([1])
    return 1


@step
async def on_the_loop() -> int:
    check_rows([1, 2])
    return 2


@step(isolation="process")
def in_a_process() -> int:
    check_rows([1, 2, 3])
    return 3


@step
def shouting() -> int:
    raise ValueError("loud " * 20_000)


@pipeline
def failing_everywhere() -> None:
    in_a_thread()
    on_the_loop()
    in_a_process()
    shouting()


async def test_each_isolation_keeps_a_traceback_that_starts_at_the_users_code() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(failing_everywhere)
        assert (await run.wait(timeout=60)).status is RunStatus.FAILED
        steps = {s.name: s for s in await run.steps()}
    for name, rows in (("in_a_thread", 1), ("on_the_loop", 2), ("in_a_process", 3)):
        text = steps[name].traceback
        assert text is not None, name
        lines = text.splitlines()
        assert lines[0] == "Traceback (most recent call last):"
        assert lines[1].startswith(f'  File "{__file__}"') and f"in {name}" in lines[1], lines
        assert "in check_rows" in text and WORKERS_DIR not in text, text
        assert lines[-1] == f"ValueError: {rows} rows is too few"
        assert steps[name].error == f"ValueError: {rows} rows is too few"
    loud = steps["shouting"]
    assert loud.error is not None and len(loud.error) == MAX_STEP_ERROR_LENGTH
    assert loud.error.startswith("ValueError: loud loud")
    assert loud.traceback is not None and len(loud.traceback) == MAX_TRACEBACK_LENGTH
    assert loud.traceback.startswith("[cut to its end: ")


LONG_ERROR = "the label column holds 17 values that are not in the schema of the training set"


class FailedRun(NamedTuple):
    id: str
    steps: dict[str, Any]
    source: Path


def _failed_run(tmp_path: Path) -> FailedRun:
    source = tmp_path / "wide.py"
    source.write_text(
        textwrap.dedent(
            f"""
            from conveyor import pipeline, step

            @step
            def rows() -> list[int]:
                return [1, 2, 3]

            def validate(xs):
                raise KeyError({LONG_ERROR!r})

            @step
            def train(xs: list[int]) -> int:
                validate(xs)
                return len(xs)

            @pipeline
            def wide():
                train(rows())
            """
        )
    )
    ran = conveyor_cli("pipeline", "run", f"{source}:wide", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    (run,) = json.loads(conveyor_cli("run", "list", "--output", "json").stdout)
    described = json.loads(conveyor_cli("run", "describe", run["id"], "--output", "json").stdout)
    return FailedRun(run["id"], {s["name"]: s for s in described["steps"]}, source)


def test_run_describe_at_80_columns_keeps_uris_errors_and_the_traceback_whole(
    tmp_path: Path,
) -> None:
    run = _failed_run(tmp_path)
    uri = run.steps["rows"]["outputs"]["output"]["uri"]
    assert len(uri) > 80
    shown = conveyor_cli("run", "describe", run.id, env={"COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert uri in out, out
    assert f"KeyError: '{LONG_ERROR}'" in out, out
    assert f'File "{run.source}", line 13, in train' in out
    for line in out.splitlines():
        if line[:1] in "┏┃┠┗":  # the tables fit the terminal; the texts are not cut
            assert len(line) <= 80, line


def test_an_error_that_looks_like_markup_is_printed_as_it_is(tmp_path: Path) -> None:
    source = tmp_path / "brackets.py"
    source.write_text(
        textwrap.dedent(
            """
            from conveyor import pipeline, step

            @step
            def label() -> str:
                return "[/red] kept"

            @step
            def parse(text: str) -> int:
                raise KeyError("[/bold] is not a column")

            @pipeline
            def brackets():
                label()
                parse(label())
            """
        )
    )
    ran = conveyor_cli("pipeline", "run", f"{source}:brackets", cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert "MarkupError" not in ran.stderr
    assert "Step 'parse' failed: KeyError: '[/bold] is not a column'" in ran.stderr
    assert 'label.output = "[/red] kept"' in ran.stdout
    (run,) = json.loads(conveyor_cli("run", "list", "--output", "json").stdout)
    for command in (("run", "describe", run["id"]), ("run", "logs", run["id"])):
        shown = conveyor_cli(*command)
        assert shown.returncode == 0, shown.stderr
        assert "KeyError: '[/bold] is not a column'" in shown.stdout


def test_run_logs_and_the_api_include_the_traceback(tmp_path: Path, home: Path) -> None:
    run = _failed_run(tmp_path)
    logs = conveyor_cli("run", "logs", run.id)
    assert logs.returncode == 0, logs.stderr
    assert "── train ──" in logs.stdout and "Step 'train' failed (attempt 1):" in logs.stdout
    assert f'File "{run.source}", line 9, in validate' in logs.stdout
    assert WORKERS_DIR not in logs.stdout

    async def from_the_api() -> list[dict[str, Any]]:
        async with serving(home) as (_, http):
            answer = await http.get(f"/api/runs/{run.id}/steps")
            assert answer.status_code == 200, answer.text
            steps: list[dict[str, Any]] = answer.json()
            return steps

    api_steps = {s["name"]: s for s in asyncio.run(from_the_api())}
    assert f"KeyError: '{LONG_ERROR}'" in str(api_steps["train"]["traceback"])
    assert api_steps["rows"]["traceback"] is None


DEEP = """
from conveyor import pipeline, step


def check(rows):
    raise ValueError(f"{len(rows)} rows is too few")


@step
def threaded() -> int:
    check([1])
    return 1


@step(isolation="process")
def forked() -> int:
    check([1, 2])
    return 2


@pipeline
def deep():
    threaded()
    forked()
"""


@pytest.mark.rabbitmq
def test_a_worker_process_on_rabbitmq_sends_the_users_traceback(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1")
    source = tmp_path / "deep.py"
    source.write_text(DEEP)
    run = processes.start("run", "pipeline", "run", f"{source}:deep")
    assert run.wait(90) == 1, processes.dump()
    with Client() as client:
        steps = {s.name: s for s in client.get_steps(only_run(client).id)}
    for name, rows in (("threaded", 1), ("forked", 2)):
        text = steps[name].traceback
        assert text is not None, name
        lines = text.splitlines()
        # The worker runs the file from its copy of the run's code archive; the traceback
        # names it as the project does, not by the worker's cache folder, same lines.
        line = 11 if rows == 1 else 17
        assert lines[1] == f'  File "deep.py", line {line}, in {name}', lines
        assert "in check" in text and WORKERS_DIR not in text, text
        assert lines[-1] == f"ValueError: {rows} rows is too few"
