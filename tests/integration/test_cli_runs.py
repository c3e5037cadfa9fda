"""``conveyor pipeline run`` and ``conveyor run ...`` as a user runs them, in subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, conveyor_cli
from tests.integration.cli_helpers import local_only, runs_pipelines

# Each test runs against a local store and against a server (tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("place")

PIPELINES = "tests/pipelines/cli_pipelines.py"

IN_THE_CLI_PROCESS = (
    "a local run lives in the process of its 'pipeline run'; through a server it lives on the "
    "server, which a killed client leaves running (Ctrl+C through a server: test_team_runs.py)"
)


def runs_json() -> list[dict[str, object]]:
    result = conveyor_cli("run", "list", "--output", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@runs_pipelines
def test_quickstart_runs_and_prints_steps_and_metric() -> None:
    result = conveyor_cli("pipeline", "run", "examples/quickstart.py:training_pipeline")
    assert result.returncode == 0, result.stderr
    out = result.stdout  # the outputs and the outcome; what each step did went to stderr
    for name in ("make_dataset", "split", "train", "evaluate"):
        assert f"completed {name}" in result.stderr
        assert f"completed {name}" not in out
    assert '"accuracy": 0.9' in out
    (run,) = runs_json()
    assert run["status"] == "completed" and run["pipeline"] == "training_pipeline"
    assert f"Run {run['id']} completed" in out


@runs_pipelines
def test_run_describe_shows_each_step_with_outputs() -> None:
    assert conveyor_cli("pipeline", "run", f"{PIPELINES}:squares", "-p", "n=4").returncode == 0
    (run,) = runs_json()
    described = conveyor_cli("run", "describe", str(run["id"])[:8], "--output", "json")
    assert described.returncode == 0, described.stderr
    data = json.loads(described.stdout)
    steps = {s["name"]: s for s in data["steps"]}
    assert [s["status"] for s in steps.values()] == ["completed"] * 3
    assert steps["square"]["attempt"] == 1 and steps["square"]["duration_s"] >= 0.05
    assert steps["total"]["outputs"]["output"]["uri"].startswith("file://")
    assert data["run"]["parameters"] == {"n": 4}
    table = conveyor_cli("run", "describe", str(run["id"]))
    assert "square" in table.stdout and "completed" in table.stdout
    # A prefix is a prefix: % and _ are not wildcards, and a huge id is just not found.
    for hostile in ("%", "_", "_" * 8, str(run["id"])[:3] + "%", "x" * 60_000):
        refused = conveyor_cli("run", "describe", hostile)
        assert refused.returncode == 1, (hostile[:20], refused.stdout)
        assert "no run with id" in refused.stderr + refused.stdout
        assert "Traceback" not in refused.stderr


@runs_pipelines
def test_failing_step_exits_1_and_shows_the_error() -> None:
    result = conveyor_cli("pipeline", "run", f"{PIPELINES}:failing")
    assert result.returncode == 1
    assert re.search(r"failed\s+explode", result.stderr)
    assert "KeyError" in result.stderr and "no such column" in result.stderr
    assert "Traceback" in result.stderr
    (run,) = runs_json()
    assert run["status"] == "failed"


@runs_pipelines
def test_pipeline_that_does_not_import_is_a_clear_error() -> None:
    result = conveyor_cli("pipeline", "run", "tests/pipelines/broken_import.py:p")
    assert result.returncode == 1
    assert "cannot import" in result.stderr and "conveyor_no_such_dependency" in result.stderr
    missing = conveyor_cli("pipeline", "run", "tests/pipelines/nope.py:p")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    not_pipeline = conveyor_cli("pipeline", "run", f"{PIPELINES}:total")
    assert not_pipeline.returncode == 1 and "not a @pipeline" in not_pipeline.stderr
    assert runs_json() == []


@runs_pipelines
def test_unknown_stack_is_a_clear_error_and_changes_nothing() -> None:
    assert conveyor_cli("pipeline", "run", f"{PIPELINES}:squares").returncode == 0
    result = conveyor_cli("pipeline", "run", f"{PIPELINES}:squares", "--stack", "defaul")
    assert result.returncode == 1
    assert "no stack named 'defaul' (did you mean: default?)" in result.stderr
    assert [r["status"] for r in runs_json()] == ["completed"]


@runs_pipelines
def test_two_processes_on_one_home_both_complete(home: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "conveyor.service.cli.app",
        "pipeline",
        "run",
        f"{PIPELINES}:squares",
        "-p",
        "n=50",
    ]
    procs = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "database is locked" not in err
    runs = runs_json()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"completed"}


@local_only(IN_THE_CLI_PROCESS)
def test_killed_run_is_marked_failed_by_the_next_command(tmp_path: Path) -> None:
    proc = _start_hanging(tmp_path / "started")
    (run,) = runs_json()
    assert run["status"] == "running", "a live process's run must not be touched"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    (run,) = runs_json()
    assert run["status"] == "failed"
    assert f"pid {proc.pid}" in str(run["error"]) and "died" in str(run["error"])
    described = json.loads(conveyor_cli("run", "describe", str(run["id"]), "-o", "json").stdout)
    assert {s["name"]: s["status"] for s in described["steps"]} == {
        "hang": "failed",
        "total": "skipped",
    }


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_hanging(marker: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "conveyor.service.cli.app",
            "pipeline",
            "run",
            f"{PIPELINES}:hanging",
        ],
        cwd=ROOT,
        env={**os.environ, "CONVEYOR_TEST_MARKER": str(marker)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run in the background (nohup, `&` in a script) hands
        # its children SIGINT ignored, and Ctrl+C would then never reach the run.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its step started"
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)
    return proc


@local_only(IN_THE_CLI_PROCESS)
def test_ctrl_c_cancels_the_run_and_another_process_cannot(tmp_path: Path) -> None:
    proc = _start_hanging(tmp_path / "started")
    (run,) = runs_json()
    refused = conveyor_cli("run", "cancel", str(run["id"]))
    assert refused.returncode == 1
    assert f"inside another process (pid {proc.pid})" in refused.stderr
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"Interrupted: cancelling run {run['id']}" in err
    (run,) = runs_json()
    assert run["status"] == "cancelled"
    assert "Ctrl+C" in str(run["error"])
    again = conveyor_cli("run", "cancel", str(run["id"]))
    assert again.returncode == 1 and "cancelled already" in again.stderr


@runs_pipelines
def test_run_logs_show_what_each_step_printed_and_logged() -> None:
    result = conveyor_cli("pipeline", "run", f"{PIPELINES}:talking")
    assert result.returncode == 1
    assert "loading 3 rows" in result.stdout, "the console still shows what steps print"
    (run,) = runs_json()
    logs = conveyor_cli("run", "logs", str(run["id"]))
    assert logs.returncode == 0, logs.stderr
    chatty_part, grumpy_part = logs.stdout.split("── grumpy ──")
    assert "── chatty ──" in chatty_part and "loading 3 rows" in chatty_part
    assert "WARNING chatty: row 2 looks odd" in chatty_part
    assert "about to fail with 3" in grumpy_part and "loading" not in grumpy_part
    only = conveyor_cli("run", "logs", str(run["id"]), "--step", "grumpy")
    assert "about to fail with 3" in only.stdout and "chatty" not in only.stdout
    unknown = conveyor_cli("run", "logs", str(run["id"]), "--step", "nope")
    assert unknown.returncode == 1 and "has no step 'nope'" in unknown.stderr


async def _record_a_running_run() -> str:
    from conveyor.service.context import Services
    from tests.store_support import record_run

    services = await Services.open()
    try:
        return await record_run(services, 1, run_id="a" * 32)
    finally:
        await services.close()


@local_only("it records a running run straight into the home's own store")
def test_deleting_an_unfinished_run_is_refused_before_the_question() -> None:
    import asyncio

    run_id = asyncio.run(_record_a_running_run())
    refused = subprocess.run(
        [sys.executable, "-m", "conveyor.service.cli.app", "run", "delete", run_id[:8]],
        input="y\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "cancel it before deleting it" in refused.stderr
    assert "Delete run" not in refused.stderr + refused.stdout, "asked in vain"
    assert [run["id"] for run in runs_json()] == [run_id]
