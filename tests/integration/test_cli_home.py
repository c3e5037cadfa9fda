"""CONVEYOR_HOME that cannot hold Conveyor's state: one line saying why, for every command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, conveyor_cli
from tests.integration.cli_helpers import local_only

# Each test runs against a local store and against a server (tests/integration/conftest.py);
# these test the home itself (a file, a read-only folder), which cannot hold a login either.
pytestmark = [
    pytest.mark.usefixtures("place"),
    local_only("the home under test is a file or read-only: it cannot be logged in"),
]

COMMANDS = [
    ["stack", "list"],
    ["run", "list", "--output", "json"],
    ["pipeline", "run", "examples/quickstart.py:training_pipeline"],
    ["server", "up", "--port", "1"],
    ["worker", "start"],
]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: "), line
    return line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_home_that_is_a_file_is_one_line(command: list[str], tmp_path: Path) -> None:
    a_file = tmp_path / "home"
    a_file.write_text("not a folder")
    # Without asyncio's debug mode: it reports pipeline run's slow start (loading the
    # pipeline's module on the event loop) on stderr, which is not what this test is about.
    env = {"CONVEYOR_HOME": str(a_file), "PYTHONASYNCIODEBUG": ""}
    line = one_line_error(conveyor_cli(*command, env=env))
    assert line == (
        f"Error: cannot keep Conveyor's state in {a_file} (CONVEYOR_HOME): it is a file, not "
        "a folder; set CONVEYOR_HOME to a folder (it is made if missing)"
    )
    assert a_file.read_text() == "not a folder"


def test_a_home_below_a_file_names_the_file(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = one_line_error(conveyor_cli("stack", "list", env={"CONVEYOR_HOME": f"{a_file}/x/y"}))
    assert f"{a_file} is a file, not a folder" in line


@pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare, as root"
)
def test_a_home_on_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    # Root may write anywhere its permissions say no; a read-only mount stops root too.
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
        f'exec "$0" -m conveyor.service.cli.app stack list'
    )
    for home in (folder, folder / "new"):
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, sys.executable],
            cwd=ROOT,
            env={**os.environ, "CONVEYOR_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        line = one_line_error(result)
        assert f"this user may not write to {folder}" in line
