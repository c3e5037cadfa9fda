"""Pipelines in a notebook: steps typed into cells, run headless on a real Jupyter kernel.

Jupyter runs an event loop in the thread that executes a cell; calling a pipeline there
must work as in a script, print nothing a notebook cannot show, and raise as a script does.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from conveyor.service.client import Client
from tests.integration.notebook_support import (
    ANSI_ESCAPE,
    error_of,
    kernel,
    printed,
    run_notebook,
    shown_text,
)
from tests.integration.rabbitmq_support import (
    Processes,
    processes,
    register_stack,
    vhost,
    wait_until,
)

__all__ = ["kernel", "processes", "vhost"]  # fixtures

STEPS = """
from conveyor import pipeline, step

@step
def double(x: int) -> int:
    return 2 * x

@step
def add(a: int, b: int) -> int:
    return a + b
"""

PIPELINE = """
@pipeline
def arithmetic(x: int = 3):
    return add(double(x), x)
"""

FAILING = """
@step
def divide(x: int) -> float:
    return x / 0

@pipeline
def broken():
    divide(double(1))

broken()
"""

CLIENT = """
from conveyor import Client

with Client() as client:
    print([run.status.value for run in client.list_runs()])
"""


def test_a_notebook_defines_steps_in_cells_runs_them_and_loads_the_output(
    kernel: str, tmp_path: Path, home: Path
) -> None:
    cells = [
        STEPS,
        PIPELINE,
        "run = arithmetic(x=5)\nprint(run.status.value, run.load('add'))",
        FAILING,
        "print('after the failure:', arithmetic().load('add'))",
        "arithmetic(x='five')",
        CLIENT,
    ]
    notebook = run_notebook(kernel, tmp_path, cells)
    _, _, ran, failed, after, mistyped, listed = notebook.cells

    assert error_of(ran) is None, error_of(ran)
    # Just what the cell prints: the run adds no line per step, as in a script.
    assert printed(ran) == "completed 15\n"
    error = error_of(failed)
    assert error is not None
    assert error[0] == "RunFailed"
    assert "step 'divide' failed: ZeroDivisionError" in error[1]
    # A later cell still runs a pipeline, and what it prints reaches that cell.
    assert printed(after) == "after the failure: 9\n"
    error = error_of(mistyped)
    assert error is not None
    assert error[0] == "ParameterError"
    assert printed(listed) == "['completed', 'failed', 'completed']\n"  # newest first
    for cell in notebook.cells:
        assert not ANSI_ESCAPE.search(shown_text(cell)), shown_text(cell)


STATISTICS = """
import math
from statistics import mean as average

from conveyor import pipeline, step

SCALE = 3


def scaled(x: float) -> float:
    return x * SCALE


@step
def spread(n: int) -> list[float]:
    return [scaled(math.sqrt(i)) for i in range(n)]


@step
def summary(xs: list[float]) -> float:
    return round(average(xs), 6)


@pipeline
def statistics(n: int = 4):
    summary(spread(n))


print(statistics(n=4).load("summary"))
"""

UNSHIPPABLE = """
model = object()


@step
def describe() -> str:
    return str(model)


@pipeline
def described():
    describe()


described()
"""


def expected_summary(scale: int) -> float:
    return round(sum(math.sqrt(i) * scale for i in range(4)) / 4, 6)


def test_cell_steps_travel_to_remote_workers_with_what_they_use_from_the_notebook(
    kernel: str, tmp_path: Path, home: Path, vhost: str, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1")
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "steps.py").write_text(STEPS)
    cells = [
        STATISTICS,
        "SCALE = 10\nprint(statistics(n=4).load('summary'))",
        UNSHIPPABLE,
        "from steps import add, double\n" + PIPELINE + "print(arithmetic(x=5).load('add'))",
    ]
    ran, edited, refused, imported = run_notebook(kernel, folder, cells).cells

    for cell in (ran, edited, imported):
        assert error_of(cell) is None, (error_of(cell), processes.dump())
    assert printed(ran) == f"{expected_summary(3)}\n"
    assert printed(edited) == f"{expected_summary(10)}\n"  # the run took the new value
    assert error_of(refused) == (
        "ConveyorError",
        "step 'describe' uses the notebook's 'model' (of type object), which cannot travel to "
        "remote workers: pass it to the step as a parameter or an output of another step, "
        "or define it in a .py file next to the notebook and import it there",
    )
    assert printed(imported) == "15\n"
    with Client(home) as client:
        runs = client.list_runs()  # the refused call published nothing
        assert [run.status.value for run in runs] == ["completed"] * 3
        # They ran on the worker process, from the run's code archive.
        steps = client.get_steps(runs[-1].id)
    assert {step.worker for step in steps} == {"w1"}


SLOW = """
import asyncio
import signal
from pathlib import Path
from typing import Any

@step
async def slow(marker: str) -> int:
    Path(marker).touch()
    await asyncio.sleep(60)
    return 1

@pipeline
def waits(marker: str):
    slow(marker)
"""


def test_interrupting_the_kernel_cancels_the_run(kernel: str, tmp_path: Path, home: Path) -> None:
    from nbclient import NotebookClient

    marker = tmp_path / "started"
    cells = [STEPS + SLOW, f"waits({str(marker)!r})", "print('next cell')"]

    def interrupt_once_started(client: NotebookClient) -> None:
        wait_until(marker.exists, "the slow step to start", timeout=60)
        assert client.km is not None and client.km.provisioner is not None
        # What Jupyter's interrupt button does: SIGINT to the kernel's process group.
        asyncio.run(client.km.provisioner.send_signal(signal.SIGINT))

    notebook = run_notebook(kernel, tmp_path, cells, while_running=interrupt_once_started)
    _, interrupted, after = notebook.cells

    assert error_of(interrupted) == ("KeyboardInterrupt", "")
    assert "cancelling run" in printed(interrupted)
    assert printed(after) == "next cell\n"
    with Client(home) as client:
        [run] = client.list_runs()
        steps = client.get_steps(run.id)
    assert run.status.value == "cancelled"
    assert [(s.name, s.status.value) for s in steps] == [("slow", "cancelled")]


def test_ctrl_c_on_a_script_cancels_its_run_as_in_a_notebook(tmp_path: Path, home: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(STEPS + SLOW + "\nimport sys\nwaits(sys.argv[1])\n")
    marker = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(marker.exists, "the slow step to start", timeout=60)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert "conveyor: interrupted: cancelling run" in stderr
    assert stderr.rstrip().endswith("KeyboardInterrupt"), stderr
    with Client(home) as client:
        [run] = client.list_runs()
        steps = client.get_steps(run.id)
    assert run.status.value == "cancelled"
    assert [(s.name, s.status.value) for s in steps] == [("slow", "cancelled")]
