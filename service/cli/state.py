"""The CLI's Client: created by the root command, closed when the command ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from conveyor.service.cli.output import user_errors

if TYPE_CHECKING:
    from conveyor.service.client import Client


def open_client(ctx: typer.Context) -> None:
    """Root callback: one Client per command invocation."""
    # Imported here, not above: the store and the records behind a Client are for the
    # commands that run, not for building them (`conveyor --help` never gets here).
    from conveyor.service.client import Client

    if ctx.obj is None:
        with user_errors():  # a damaged login file is one line too
            ctx.obj = Client()
        ctx.call_on_close(ctx.obj.close)


def client(ctx: typer.Context) -> Client:
    from conveyor.service.client import Client

    found = ctx.find_root().obj
    assert isinstance(found, Client)
    return found
