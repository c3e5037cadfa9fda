"""Embedding Conveyor leaves the application's logging as the application set it.

Each test runs a fresh interpreter as the embedding application: the test process has
configured structlog already (tests/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from structlog.testing import capture_logs

from conveyor.workers.loggers import get_logger

EMBED = """
import asyncio, sys
from conveyor import Conveyor

async def main():
    async with Conveyor(home=sys.argv[1]) as cv:  # the embedded default stack
        assert cv.controller_alive

asyncio.run(main())
"""


def embedding(app: str, home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", app, str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CONVEYOR_HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr
    return done


def test_an_application_without_structlog_configuration_keeps_none(tmp_path: Path) -> None:
    app = EMBED + (
        "import structlog\n"
        "assert not structlog.is_configured(), 'Conveyor configured structlog'\n"
        "from conveyor.workers.loggers import get_logger\n"
        "get_logger('conveyor.test').warning('a warning of conveyor', key=1)\n"
    )
    done = embedding(app, tmp_path)
    # Nothing on the application's stdout (structlog's default, unconfigured, prints every
    # level there: Conveyor's INFO lines, "controller started", must not), and Conveyor's
    # own warnings on stderr as the CLI would show them, its INFO lines not.
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert json.loads(line) | {"timestamp": None} == {
        "event": "a warning of conveyor",
        "key": 1,
        "level": "warning",
        "timestamp": None,
    }


def test_an_applications_own_configuration_stays_and_conveyor_logs_through_it(
    tmp_path: Path,
) -> None:
    app = (
        "import logging, structlog, sys\n"
        "structlog.configure(\n"
        "    processors=[structlog.processors.KeyValueRenderer(key_order=['event'])],\n"
        "    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),\n"
        ")\n"
        "before = structlog.get_config()\n"
        "logging.basicConfig(level=logging.ERROR)\n"
        "handlers = list(logging.getLogger().handlers)\n"
        "streams = (sys.stdout, sys.stderr)\n"
        + EMBED
        + "assert structlog.get_config() == before, 'Conveyor reconfigured structlog'\n"
        "assert logging.getLogger().level == logging.ERROR\n"
        # What the embedded worker pool wrapped to record steps' output, it gave back.
        "assert logging.getLogger().handlers == handlers, logging.getLogger().handlers\n"
        "assert (sys.stdout, sys.stderr) == streams, 'stdout or stderr still wrapped'\n"
    )
    done = embedding(app, tmp_path)
    # The application asked for INFO as key=value lines on stdout: Conveyor's come so.
    assert "event='controller started'" in done.stdout
    assert "event='worker started'" in done.stdout


def test_conveyor_logs_go_through_structlog_once_it_is_configured() -> None:
    with capture_logs() as logs:
        get_logger("conveyor.test").warning("seen by the application", n=1)
    assert logs == [{"event": "seen by the application", "n": 1, "log_level": "warning"}]
