"""Start-up time of the ``conveyor`` command, beside a bare ``python -c "import typer"``.

Whole processes, as a user waits for them: ``conveyor --help``, ``conveyor stack list``,
``conveyor run list`` and ``conveyor pipeline run`` of a one-step pipeline, in interleaved
rounds on one temporary CONVEYOR_HOME prepared once. Each command's median is printed with
its ratio to the bare typer process measured in the same rounds (the machine may be busy;
the ratio is the figure to compare), in wall time and in CPU time (user + system of the
process), which a busy machine disturbs less.

    python benchmarks/cli.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BASELINE = "python -c 'import typer'"
PIPELINE_FILE = "one_step.py"
PIPELINE_SOURCE = """\
from conveyor import pipeline, step


@step
def hello() -> str:
    return "hello"


@pipeline
def one_step() -> None:
    hello()
"""


@dataclass
class Result:
    command: str
    median_s: float
    ratio_to_typer: float
    cpu_median_s: float
    cpu_ratio_to_typer: float


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


def conveyor_command() -> str:
    """The ``conveyor`` script installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("conveyor")
    found = str(beside) if beside.exists() else shutil.which("conveyor")
    if found is None:
        raise SystemExit("no `conveyor` command found: pip install -e . first")
    return found


def commands(conveyor: str) -> dict[str, list[str]]:
    return {
        BASELINE: [sys.executable, "-c", "import typer"],
        "conveyor --help": [conveyor, "--help"],
        "conveyor stack list": [conveyor, "stack", "list"],
        "conveyor run list": [conveyor, "run", "list"],
        "conveyor pipeline run": [conveyor, "pipeline", "run", f"{PIPELINE_FILE}:one_step"],
    }


def cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], *, cwd: Path, env: dict[str, str]) -> Timing:
    cpu, started = cpu_of_children(), time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    timing = Timing(time.perf_counter() - started, cpu_of_children() - cpu)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
    return timing


def measure(rounds: int) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-cli-") as folder:
        workdir = Path(folder)
        (workdir / PIPELINE_FILE).write_text(PIPELINE_SOURCE)
        # As a user runs it: bytecode cached (an install compiles it; an editable one on
        # first use), so PYTHONDONTWRITEBYTECODE would measure compiling, not starting.
        dropped = {"CONVEYOR_STACK", "PYTHONDONTWRITEBYTECODE"}
        env = {k: v for k, v in os.environ.items() if k not in dropped}
        env["CONVEYOR_HOME"] = str(workdir / "home")
        argvs = commands(conveyor_command())
        timings: dict[str, list[Timing]] = {name: [] for name in argvs}
        # Prepared once, not timed: the store and its default stack, a run to list, and
        # each command's bytecode cache.
        for argv in argvs.values():
            timed(argv, cwd=workdir, env=env)
        for _ in range(rounds):
            for name, argv in argvs.items():
                timings[name].append(timed(argv, cwd=workdir, env=env))
    wall = {name: statistics.median(t.wall_s for t in ts) for name, ts in timings.items()}
    cpu = {name: statistics.median(t.cpu_s for t in ts) for name, ts in timings.items()}
    return [
        Result(
            command=name,
            median_s=round(wall[name], 4),
            ratio_to_typer=round(wall[name] / wall[BASELINE], 2),
            cpu_median_s=round(cpu[name], 4),
            cpu_ratio_to_typer=round(cpu[name] / cpu[BASELINE], 2),
        )
        for name in timings
    ]


def print_table(results: list[Result]) -> None:
    print(f"{'command':<28}{'median s':>10}{'x typer':>9}{'cpu s':>8}{'x typer':>9}")
    for r in results:
        print(
            f"{r.command:<28}{r.median_s:>10.3f}{r.ratio_to_typer:>9.2f}"
            f"{r.cpu_median_s:>8.3f}{r.cpu_ratio_to_typer:>9.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    arguments = parser.parse_args()
    if arguments.rounds < 1:
        parser.error("--rounds must be at least 1")
    measured = measure(arguments.rounds)
    if arguments.json:
        for result in measured:
            sys.stdout.write(json.dumps(asdict(result)) + "\n")
    else:
        print_table(measured)
