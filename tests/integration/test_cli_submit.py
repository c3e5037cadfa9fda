"""``conveyor pipeline run`` refusing what cannot run before anything starts, in subprocesses."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, conveyor_cli
from tests.integration.cli_helpers import runs_pipelines

# Each test runs against a local store and against a server (tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("place")

QUICKSTART = "examples/quickstart.py:training_pipeline"


def runs() -> list[dict[str, object]]:
    result = conveyor_cli("run", "list", "--output", "json")
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


@runs_pipelines
def test_a_parameter_of_the_wrong_type_is_refused_before_any_step_runs() -> None:
    result = conveyor_cli("pipeline", "run", QUICKSTART, "-p", "epochs=abc")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(
        "Error: pipeline 'training_pipeline': parameter 'epochs' expects int, got 'abc'"
    )
    assert result.stdout == "", "nothing ran"
    assert runs() == []


@runs_pipelines
def test_unknown_and_missing_parameters_are_refused_with_exit_2(tmp_path: Path) -> None:
    unknown = conveyor_cli("pipeline", "run", QUICKSTART, "-p", "epoch=3")
    assert unknown.returncode == 2
    assert "no parameter 'epoch'; did you mean 'epochs'?" in unknown.stderr
    script = tmp_path / "needs.py"
    script.write_text(
        "from conveyor import pipeline, step\n"
        "@step\ndef one(x: int) -> int:\n    return x\n"
        "@pipeline\ndef needs(size: int) -> None:\n    one(size)\n"
    )
    missing = conveyor_cli("pipeline", "run", f"{script}:needs")
    assert missing.returncode == 2 and "missing parameter 'size' (int)" in missing.stderr
    assert runs() == []


@runs_pipelines
def test_parameters_given_as_text_become_the_types_the_pipeline_wants() -> None:
    result = conveyor_cli("pipeline", "run", QUICKSTART, "-p", "epochs=5", "-p", "n_samples=1e2")
    assert result.returncode == 0, result.stderr
    (run,) = runs()
    assert run["parameters"] == {"epochs": 5, "n_samples": 100}


@runs_pipelines
def test_a_mistyped_pipeline_suggests_the_close_name_and_names_the_file() -> None:
    result = conveyor_cli("pipeline", "run", "examples/quickstart.py:training_pipelin")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Error: examples/quickstart.py has no pipeline 'training_pipelin'; did you mean "
        "'training_pipeline'?"
    )


@runs_pipelines
def test_a_module_of_the_working_directory_resolves_by_name() -> None:
    # The installed command, not `python -m` (which puts the working directory on the path).
    command = Path(sys.executable).parent / "conveyor"
    result = subprocess.run(
        [str(command), "pipeline", "run", "examples.quickstart:training_pipeline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "completed evaluate" in result.stderr
    mistyped = conveyor_cli("pipeline", "run", "examples.quickstart:trainin_pipeline")
    assert "module 'examples.quickstart' has no pipeline 'trainin_pipeline'; did you mean" in (
        mistyped.stderr
    )


SLOW_PIPELINE = """
import time
from conveyor import pipeline, step

@step
def wait(i: int) -> int:
    time.sleep(0.6)
    return i

@pipeline
def slow() -> None:
    wait(wait(wait(1)))
"""


@runs_pipelines
def test_a_terminal_shows_a_live_bar_while_a_run_goes_on(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PIPELINE)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.service.cli.app", "pipeline", "run", f"{script}:slow"],
        cwd=ROOT,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, shown.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert re.search(r"slow .*━.* [12]/3 steps · 1 running · 0 failed", text), text
    assert "completed wait_3" in text


@runs_pipelines
def test_piped_output_has_one_line_per_step_change_and_no_bar(tmp_path: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_PIPELINE)
    # A narrow COLUMNS wraps no line: scripts read the run's id from the first one. Without
    # asyncio's debug mode, whose slow-callback warnings a busy machine adds to stderr.
    env = {"COLUMNS": "40", "PYTHONASYNCIODEBUG": ""}
    result = conveyor_cli("pipeline", "run", f"{script}:slow", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()  # what the run does; stdout has its outcome
    assert re.fullmatch(r"Running pipeline slow on stack 'default' as run [0-9a-f]{32}", lines[0])
    assert result.stdout.splitlines() == ["wait_3.output = 1", result.stdout.splitlines()[-1]]
    assert result.stdout.splitlines()[-1].startswith("Run ")
    assert [line.split()[:2] for line in lines[1:4]] == [
        ["completed", "wait"],
        ["completed", "wait_2"],
        ["completed", "wait_3"],
    ]
    assert "steps ·" not in result.stdout + result.stderr
