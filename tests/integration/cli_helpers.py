"""Running ``conveyor`` in-process with typer's CliRunner, and reading its tables."""

from __future__ import annotations

import json
from typing import Any

from click.testing import Result
from typer.testing import CliRunner

from conveyor.service.cli.app import app

runner = CliRunner()


def cli(*args: str) -> Result:
    return runner.invoke(app, list(args))


def ok(*args: str) -> Result:
    result = cli(*args)
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    return result


def refused(*args: str) -> str:
    """The one-line error of a command that must fail with exit code 1."""
    result = cli(*args)
    assert result.exit_code == 1, (args, result.stdout, result.stderr)
    assert result.stderr.startswith("Error: "), result.stderr
    return " ".join(result.stderr.split())


def as_json(*args: str) -> Any:
    return json.loads(ok(*args, "--output", "json").stdout)


def rows(output: str) -> list[list[str]]:
    """The cells of each row (header first) of the rich tables in ``output``."""
    return [
        [cell.strip() for cell in line.strip("┃").split("│")]
        for line in output.splitlines()
        if line.startswith("┃") and "│" in line
    ]
