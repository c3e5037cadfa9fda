"""The ``conveyor`` command starts without the parts only some commands need.

Each test runs a fresh interpreter, so that what the test process imported does not count.
The start-up time itself is measured by ``benchmarks/cli.py``, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Each costs tens of milliseconds or more to import and serves only some commands: running
# steps (numpy), rabbitmq stacks (aio-pika), the server (FastAPI), s3 stores (obstore), the
# engine and controller (pipeline run), logging (structlog), stack files (yaml).
HEAVY = (
    "numpy",
    "aio_pika",
    "aiormq",
    "fastapi",
    "starlette",
    "uvicorn",
    "obstore",
    "structlog",
    "yaml",
    "conveyor.service.engine",
    "conveyor.service.controller",
    "conveyor.service.gateway",
    "conveyor.service.pipelines",
    "conveyor.workers.execution",
    "conveyor.workers.runtime",
)

# What `conveyor --help` does without: it builds the commands (names, options, help texts)
# and runs none, so the records (pydantic models), the store, the client, rich's consoles and
# asyncio are for the commands that run. Each is tens of milliseconds on a start of ~0.1 s.
NOT_FOR_HELP = (
    "pydantic",
    "rich",
    "asyncio",
    "aiosqlite",
    "platformdirs",
    "conveyor.contracts.models",
    "conveyor.contracts.events",
    "conveyor.contracts.pipeline_spec",
    "conveyor.service.store",
    "conveyor.service.client",
    "conveyor.workers.flavors",
)

# What the commands that list and show records do without: the event models (the records
# are in contracts/models.py), which the store, the stack rules and the flavors' configs
# need only to publish or read events. Building them is tens of milliseconds.
NOT_FOR_LISTINGS = (
    "conveyor.contracts.events",
    "conveyor.contracts.protocols",
    "conveyor.contracts.unreadable",
)
# Nor do listing stacks and runs build a pipeline spec, nor load the stack probes (with
# which a change of a stack moves its queues) or the stack export format.
NOT_FOR_LIST = (
    "conveyor.contracts.pipeline_spec",
    "conveyor.workers.stack_probes",
    "conveyor.service.queue_moves",
    "conveyor.service.stack_files",
)

# Prints the modules loaded when the interpreter exits (a command ends in SystemExit).
AT_EXIT = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))
"""
COMMAND = """
sys.argv = ["conveyor", *json.loads(sys.argv[1])]
from conveyor.service.cli.app import main
main()
"""


def loaded_by(code: str, *args: str, cwd: Path | None = None) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", AT_EXIT + code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return set(modules)


def test_importing_the_cli_loads_none_of_the_heavy_modules() -> None:
    loaded = loaded_by("import conveyor.service.cli.app")
    assert "conveyor.service.cli.app" in loaded
    assert sorted(loaded.intersection(HEAVY)) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["stack", "list"],
        ["stack", "list", "--output", "json"],
        ["run", "list"],
        ["orchestrator", "list"],
        ["artifact-store", "describe", "default"],
    ],
)
def test_listing_commands_load_none_of_the_heavy_modules(args: list[str]) -> None:
    loaded = loaded_by(COMMAND, json.dumps(args))
    assert sorted(loaded.intersection(HEAVY)) == []


@pytest.mark.parametrize(
    "args",
    [["stack", "list"], ["run", "list"], ["stack", "describe"], ["orchestrator", "list"]],
)
def test_listing_commands_build_no_event_models(args: list[str]) -> None:
    loaded = loaded_by(COMMAND, json.dumps(args))
    assert "conveyor.service.client" in loaded
    assert sorted(loaded.intersection(NOT_FOR_LISTINGS)) == []


@pytest.mark.parametrize("args", [["stack", "list"], ["run", "list"], ["artifact", "list"]])
def test_lists_build_no_spec_and_load_no_probes(args: list[str]) -> None:
    loaded = loaded_by(COMMAND, json.dumps(args))
    assert sorted(loaded.intersection(NOT_FOR_LIST)) == []


def test_the_client_imports_no_event_models() -> None:
    loaded = loaded_by("import conveyor.service.client")
    assert sorted(loaded.intersection(HEAVY + NOT_FOR_LISTINGS + NOT_FOR_LIST)) == []


def test_a_run_whose_steps_make_no_array_imports_no_numpy(tmp_path: Path) -> None:
    (tmp_path / "one_step.py").write_text(
        "from conveyor import pipeline, step\n\n\n"
        "@step\ndef hello() -> str:\n    return 'hello'\n\n\n"
        "@pipeline\ndef one_step() -> None:\n    hello()\n"
    )
    loaded = loaded_by(
        COMMAND, json.dumps(["pipeline", "run", "one_step.py:one_step"]), cwd=tmp_path
    )
    assert "conveyor.workers.materializers.builtin" in loaded  # its output was materialized
    assert "numpy" not in loaded


def test_help_loads_no_records_store_or_consoles() -> None:
    loaded = loaded_by(COMMAND, json.dumps(["--help"]))
    assert "conveyor.service.cli.stack" in loaded  # the commands were built
    assert sorted(loaded.intersection(HEAVY + NOT_FOR_HELP)) == []


def test_import_conveyor_loads_what_is_used_only() -> None:
    loaded = loaded_by("import conveyor")
    assert sorted(loaded.intersection(HEAVY)) == []
    used = loaded_by("from conveyor import step")
    assert "conveyor.workers.steps" in used
    assert "conveyor.service.engine" not in used


def test_a_command_that_logs_logs_to_stderr_as_configured() -> None:
    code = (
        "from conveyor.service.logs import configure_logging_when_used\n"
        "configure_logging_when_used()\n"
        "import sys; assert 'structlog' not in sys.modules\n"
        "import structlog\n"
        "structlog.get_logger('test').warning('shown on stderr', key=1)\n"
        "structlog.get_logger('test').info('below the level')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert json.loads(line) | {"timestamp": None} == {
        "event": "shown on stderr",
        "key": 1,
        "level": "warning",
        "timestamp": None,
    }
