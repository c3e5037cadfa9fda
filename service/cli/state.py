"""The CLI's Client: created by the root command, closed when the command ends."""

from __future__ import annotations

import typer

from conveyor.service.cli.output import user_errors
from conveyor.service.client import Client


def open_client(ctx: typer.Context) -> None:
    """Root callback: one Client per command invocation."""
    if ctx.obj is None:
        with user_errors():  # a damaged login file is one line too
            ctx.obj = Client()
        ctx.call_on_close(ctx.obj.close)


def client(ctx: typer.Context) -> Client:
    found = ctx.find_root().obj
    assert isinstance(found, Client)
    return found
