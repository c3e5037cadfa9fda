"""Every command's ``--help`` as a user reads it: flags without a type beside them."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from conveyor.service.cli.app import app
from tests.integration.cli_helpers import ok

# Each test runs against a local store and against a server (tests/integration/conftest.py).
pytestmark = pytest.mark.usefixtures("place")


def every_command(command: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    """``command`` and each command under it, groups included, with their paths."""
    children = getattr(command, "commands", {})
    found = [(path, command)]
    for name, child in children.items():
        found += every_command(child, [*path, name])
    return found


def option_columns(help_text: str) -> list[str]:
    return [
        line.strip().split("  ")[0] for line in help_text.splitlines() if line.startswith("  -")
    ]


def test_no_help_shows_a_type_beside_a_flag() -> None:
    commands = every_command(typer.main.get_command(app), [])
    assert len(commands) >= 40
    flags_seen = 0
    for path, command in commands:
        text = ok(*path, "--help").stdout
        assert "<bool>" not in text, (path, text)
        assert "<list[" not in text, (path, text)  # a repeatable option names its value
        flags = [p.opts for p in command.params if getattr(p, "is_flag", False)]
        for names in [*flags, ["--help"]]:
            # The option column of a flag's line: "-y, --yes", with nothing after the names.
            [column] = [c for c in option_columns(text) if set(names) <= set(c.split(", "))]
            assert set(column.split(", ")) == set(names), (path, column)
            flags_seen += 1
    assert flags_seen > len(commands)


def test_options_that_take_a_value_still_show_its_type() -> None:
    text = " ".join(ok("run", "list", "--help").stdout.split())
    assert "--limit <int>" in text
    assert "--stack <str>" in text
