"""How the CLI prints: rich tables in the style of the stack tables, or JSON for scripts."""

from __future__ import annotations

import enum
import functools
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# rich, pydantic and the store are imported where they are used, not here: every command
# imports this module, and `conveyor --help` needs none of them.

# Piped output (scripts, tests) must not be cut to 80 columns, unless COLUMNS says so.
_WIDTH_SET = bool(os.environ.get("COLUMNS"))


@functools.cache
def console() -> Console:
    """Where the data a user asked for goes: stdout."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() or _WIDTH_SET else 200)


@functools.cache
def status() -> Console:
    """What a command did ("Registered stack ...", with its table) goes to stderr, beside
    errors: stdout holds only the data a user asked for, to pipe or redirect."""
    from rich.console import Console

    return Console(
        stderr=True, highlight=False, width=None if sys.stderr.isatty() or _WIDTH_SET else 200
    )


@functools.cache
def errors() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


T = TypeVar("T")


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"


OUTPUT_OPTION = typer.Option(OutputFormat.table, "--output", "-o", help="table or json")


YES_OPTION = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation")


def confirm(question: str, yes: bool) -> None:
    """Ask ``question`` on stderr unless ``yes`` (the ``--yes`` of a delete); anything but a
    yes aborts with exit code 1, and so does no answer at all: a script without a terminal
    passes --yes rather than deleting unasked. Ask it after the rules' checks: what would be
    refused anyway is told first."""
    if not yes:
        typer.confirm(question, abort=True, err=True)


SLOW_NOTE_AFTER_S = 1.0
"""How long a call may take before ``noted_if_slow`` says what it waits for."""


@contextmanager
def noted_if_slow(text: str, after_s: float = SLOW_NOTE_AFTER_S) -> Iterator[None]:
    """Say ``text`` on stderr once the block has taken ``after_s`` (a broker that does not
    answer, say); a quick answer says nothing."""
    import threading

    timer = threading.Timer(after_s, say, (text,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def say(text: str) -> None:
    """A line for the user on stderr (what a run waits for, what became of it after an
    interrupt); the user's text is not markup."""
    errors().print(text, markup=False, highlight=False)


def escape(text: str) -> str:
    """``text`` shown as it is inside rich markup."""
    from rich.markup import escape as escaped

    return escaped(text)


def fail(message: str) -> NoReturn:
    errors().print(f"[red]Error:[/red] {escape(message)}")
    raise typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ConveyorError into a one-line message and exit code 1.

    So is a SQLite error of the metadata store met after it opened (a disk that filled up,
    a page found damaged): the CLI's store is always the one of CONVEYOR_HOME.
    """
    from conveyor.contracts import ConveyorError

    try:
        yield
    except ConveyorError as exc:
        fail(str(exc))
    except sqlite3.Error as exc:
        from conveyor.service.home import Home
        from conveyor.service.store import store_error

        fail(str(store_error(Home.resolve().db_path, exc)))


def print_json(value: Any) -> None:
    from pydantic import BaseModel

    def default(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, datetime):
            return obj.isoformat()
        raise TypeError(type(obj).__name__)

    sys.stdout.write(json.dumps(value, default=default, indent=2) + "\n")


def table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    caption: str | None = None,
) -> Table:
    from rich import box
    from rich.table import Table

    result = Table(title=title, caption=caption, box=box.HEAVY_EDGE, caption_justify="center")
    for column in columns:
        # An id or a URI too long for its column is folded onto more lines, never cut.
        result.add_column(column, overflow="fold")
    for row in rows:
        # Cells hold user data (list[str], [section]): never read them as rich markup.
        result.add_row(*["" if cell is None else escape(str(cell)) for cell in row])
    return result


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else ""


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def emit(fmt: OutputFormat, data: T, render: Callable[[T], Any]) -> None:
    """Print ``data`` as JSON or through ``render``."""
    if fmt is OutputFormat.json:
        print_json(data)
        return
    from rich.text import Text

    rendered = render(data)
    for part in rendered if isinstance(rendered, list) else [rendered]:
        # Texts are not broken into lines by rich: a terminal folds a long URI or error
        # line without cutting it, and a copy of it stays whole.
        console().print(part, soft_wrap=isinstance(part, str | Text))
