"""Running ``conveyor`` in-process with typer's CliRunner, and reading its tables.

Every helper runs in the test's CONVEYOR_HOME, or in ``home=`` when given. A home logged in to
a server (``log_in``) sends every command to that server: running a CLI test against a server
instead of a local store is then a fixture that starts a server (``team_server``) and logs
the test's home in before the test's commands run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from conveyor.service.cli.app import app

runner = CliRunner()


def cli(*args: str, home: Path | None = None) -> Result:
    env = {"CONVEYOR_HOME": str(home)} if home is not None else None
    return runner.invoke(app, list(args), env=env)


def ok(*args: str, home: Path | None = None) -> Result:
    result = cli(*args, home=home)
    assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
    return result


def refused(*args: str, home: Path | None = None) -> str:
    """The one-line error of a command that must fail with exit code 1."""
    result = cli(*args, home=home)
    assert result.exit_code == 1, (args, result.stdout, result.stderr)
    assert result.stderr.startswith("Error: "), result.stderr
    return " ".join(result.stderr.split())


def as_json(*args: str, home: Path | None = None) -> Any:
    return json.loads(ok(*args, "--output", "json", home=home).stdout)


# --- client mode: the same commands against a server ---


def local_only(reason: str) -> pytest.MarkDecorator:
    """Run this test of a suite that uses the ``place`` fixture (tests/integration/conftest.py)
    against a local store only, for ``reason`` (what the server variant lacks); deleting
    the mark runs its server variant too."""
    return pytest.mark.local_only(reason=reason)


runs_pipelines = pytest.mark.runs_pipelines
"""The test runs pipelines on the default stack: its server variant logs in as an admin, since
a server runs only an admin's code in its own process (a member's runs go to worker stacks)."""


ADMIN_TOKEN = "admin-token-for-cli-tests-0123456789"


@contextmanager
def team_server(logs: Path, server_home: Path) -> Iterator[str]:
    """A ``conveyor server up`` in ``server_home`` whose admin token is ``ADMIN_TOKEN``;
    yields its URL."""
    from tests.conftest import running_server

    env = {
        "CONVEYOR_HOME": str(server_home),
        "CONVEYOR_ADMIN_TOKEN": ADMIN_TOKEN,
        "CONVEYOR_SERVER_TOKEN": "",
    }
    with running_server(logs, env=env) as server:
        yield server.url


def log_in(home: Path, url: str, token: str = ADMIN_TOKEN) -> None:
    """Log ``home`` in to the server at ``url``: from then on its commands go there."""
    ok("login", url, "--token", token, home=home)


def new_user(name: str, *, admin_home: Path, admin: bool = False) -> str:
    """A member (or an admin) ``name`` made by the admin logged in from ``admin_home``; their
    token."""
    role = ["--admin"] if admin else []
    return ok("user", "create", name, *role, home=admin_home).stdout.strip()


def rows(output: str) -> list[list[str]]:
    """The cells of each row (header first) of the rich tables in ``output``."""
    return [
        [cell.strip() for cell in line.strip("┃").split("│")]
        for line in output.splitlines()
        if line.startswith("┃") and "│" in line
    ]
