"""``conveyor login``, ``conveyor logout`` and ``conveyor status``: client mode.

Logged in, this home's CLI and Python ``Client`` work on the server's stacks and runs, as
the user whose token was given; the token is kept in the home's ``login.json`` (mode 0600)
and never printed.
"""

from __future__ import annotations

import os
from typing import Any

import typer

from conveyor.service.cli.output import fail, status, user_errors
from conveyor.service.cli.state import client
from conveyor.service.home import Home
from conveyor.service.login import SERVER_TOKEN_ENV, Login, forget_login, read_login, save_login

# The users' rules and the version's checks (each behind the records) are imported in the
# commands that use them: `conveyor --help` builds these commands without them.


def _server_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    return url


def login(
    url: str = typer.Argument(..., help="The server, e.g. https://conveyor.example.com"),
    token: str = typer.Option(
        None, "--token", help=f"Your API token (default: ${SERVER_TOKEN_ENV}, else asked for)"
    ),
) -> None:
    """Log this home in to a Conveyor server: from now on, commands and Client() use it.

    Example: conveyor login https://conveyor.example.com --token "$TOKEN"
    """
    import httpx

    from conveyor.service.version import conveyor_version, incompatible

    home = Home.resolve()
    given = token or os.environ.get(SERVER_TOKEN_ENV) or typer.prompt("Token", hide_input=True)
    server = _server_url(url)
    try:
        response = httpx.get(
            f"{server}/api/me", headers={"Authorization": f"Bearer {given}"}, timeout=30
        )
    except httpx.TransportError as exc:
        fail(f"cannot reach {server} ({type(exc).__name__}); check the URL and that it is up")
    if response.status_code == 401:
        fail(f"{server} does not know this token (wrong, rotated, or of a deleted user)")
    if response.status_code != 200:
        fail(f"{server} answered {response.status_code} to /api/me: is it a Conveyor server?")
    me = response.json()
    problem = incompatible(conveyor_version(), str(me.get("server_version", "?")))
    if problem:
        fail(problem)
    path = save_login(home, Login(url=server, user=str(me["name"]), token=given))
    status().print(
        f"Logged in to {server} as {me['name']} ({me['role']}); the token is kept in {path}, "
        "readable by you only. conveyor logout returns to this home's own store."
    )
    problem = _active_stack_problem(me)
    if problem:
        status().print(problem)


def _active_stack_problem(me: dict[str, Any]) -> str | None:
    """Why the member's active stack would not take their runs, and what to do; None when
    it would (or the server is too old to say)."""
    from conveyor.service.users import code_refused

    active = str(me["active_stack"])
    if not me.get("active_stack_visible", True):
        return _not_visible(active)
    if not me.get("active_stack_runs_your_code", True):
        refused = code_refused(active, [str(s) for s in me.get("stacks_for_your_code", [])])
        return f"Your active stack will not take your runs: {refused}."
    return None


def _not_visible(stack: str) -> str:
    return (
        f"Your active stack, '{stack}', is not one you may use (another user's private "
        "stack, or deleted): conveyor stack list shows the stacks you may use (yours and the "
        "shared ones), conveyor stack set NAME makes one active, and an admin may share "
        f"'{stack}' with conveyor stack share {stack}."
    )


def logout() -> None:
    """Forget this home's login; commands use the home's own store again.

    Example: conveyor logout
    """
    with user_errors():
        login = read_login(Home.resolve())
        forgotten = forget_login(Home.resolve())
    if forgotten and login is not None:
        status().print(f"Logged out of {login.url}; commands use this home's own store again.")
    else:
        status().print("Not logged in; commands use this home's own store.")


def show_status(ctx: typer.Context) -> None:
    """Where commands go: the server, user, active stack and version, or the local store.

    The token is never shown.

    Example: conveyor status
    """
    from conveyor.service.version import conveyor_version, incompatible

    home = Home.resolve()
    with user_errors():
        login = read_login(home)
        c = client(ctx)
        if login is None:
            typer.echo(f"Local store: {home.path}")
            typer.echo(f"Active stack: {c.active_stack_name()}")
            typer.echo(f"Conveyor: {conveyor_version()}")
            return
        from conveyor.service.remote_client import RemoteClient

        assert isinstance(c, RemoteClient)
        me = c.me()
    server_version = str(me["server_version"])
    typer.echo(f"Server: {login.url}")
    typer.echo(f"User: {me['name']} ({me['role']})")
    active = os.environ.get("CONVEYOR_STACK") or me["active_stack"]
    typer.echo(f"Active stack: {active}")
    problem = None if "CONVEYOR_STACK" in os.environ else _active_stack_problem(me)
    if problem:
        typer.echo(problem)
    typer.echo(f"Server version: {server_version} (this client: {conveyor_version()})")
    problem = incompatible(conveyor_version(), server_version)
    if problem:
        fail(problem)
