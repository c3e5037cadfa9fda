"""The ``conveyor`` command."""

from __future__ import annotations

import typer

from conveyor.service.cli import login, runs, server, services, stack, users
from conveyor.service.cli.components import COMMANDS, component_app
from conveyor.service.cli.state import open_client
from conveyor.service.logs import configure_logging_when_used

app = typer.Typer(
    help="Conveyor: event-driven ML pipelines on stacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's own help and error layout: rich panels show a type (`<bool>`) beside every
    # flag, and an error is then one plain `Error:` line like the CLI's own.
    rich_markup_mode=None,
    add_completion=False,
)
app.callback()(open_client)
app.add_typer(stack.app, name="stack")
for command in COMMANDS:
    app.add_typer(component_app(command), name=command.command)
app.add_typer(runs.pipeline_app, name="pipeline")
app.add_typer(runs.run_app, name="run")
app.add_typer(runs.artifact_app, name="artifact")
app.add_typer(server.app, name="server")
app.add_typer(users.app, name="user")
app.command("login")(login.login)
app.command("logout")(login.logout)
app.command("status")(login.show_status)
app.add_typer(services.worker_app, name="worker")
app.add_typer(services.controller_app, name="controller")
app.add_typer(services.contracts_app, name="contracts")


def main() -> None:
    configure_logging_when_used()
    app()


if __name__ == "__main__":
    main()
