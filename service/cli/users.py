"""``conveyor user ...``: users of a server and their tokens.

Run on the server's own home (the local admin acts), or, once logged in, through the
server's API by an admin. A token is printed once, on stdout (it is the data asked for), and
never again: the store keeps only its digest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from conveyor.contracts import Role
from conveyor.service.cli.output import (
    OUTPUT_OPTION,
    YES_OPTION,
    OutputFormat,
    confirm,
    console,
    emit,
    status,
    table,
    user_errors,
    when,
)
from conveyor.service.cli.state import client

if TYPE_CHECKING:
    from conveyor.contracts import UserRecord

app = typer.Typer(
    help="Users of a server and their API tokens (people, and service accounts for CI).",
    no_args_is_help=True,
)


EXPIRES_OPTION = typer.Option(
    None,
    "--expires-in",
    help="The token's lifetime, as 12h, 30d or 2w (1h to 366d); default: until rotated",
)


def _lifetime(user: UserRecord) -> str:
    if user.token_expires is None:
        return "the token works until it is rotated"
    return f"the token expires at {when(user.token_expires)}"


def _print_token(token: str) -> None:
    # Plain print: a token must never be wrapped, styled or cut.
    console().print(token, soft_wrap=True, markup=False)


@app.command("create")
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The new user's name"),
    admin: bool = typer.Option(False, "--admin", help="An admin (default: a member)"),
    expires_in: str = EXPIRES_OPTION,
) -> None:
    """Create a user and print their token, once (a service account for CI is a user too).

    Example: conveyor user create alice --expires-in 30d
    """
    role = Role.ADMIN if admin else Role.MEMBER
    with user_errors():
        user, token = client(ctx).create_user(name, role, expires_in)
    status().print(
        f"Created {user.role.value} '{user.name}' ({_lifetime(user)}). Their token is printed "
        "below, once; hand it over safely (they log in with: conveyor login URL --token TOKEN)"
    )
    _print_token(token)


@app.command("list")
def list_users(ctx: typer.Context, output: OutputFormat = OUTPUT_OPTION) -> None:
    """List the server's users and their roles (never their tokens).

    Example: conveyor user list --output json
    """
    with user_errors():
        users = client(ctx).list_users()
    emit(
        output,
        users,
        lambda found: table(
            ["USER", "ROLE", "CREATED", "TOKEN EXPIRES"],
            [[u.name, u.role.value, when(u.created), when(u.token_expires) or "-"] for u in found],
        ),
    )


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user to delete"),
    yes: bool = YES_OPTION,
) -> None:
    """Delete a user: their token gets 401 from now on; their stacks and runs stay.

    Example: conveyor user delete alice --yes
    """
    confirm(f"Delete user '{name}'? Their token stops working at once.", yes)
    with user_errors():
        client(ctx).delete_user(name)
    status().print(f"Deleted user '{name}'")


@app.command("rotate-token")
def rotate_token(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Whose token to replace"),
    expires_in: str = EXPIRES_OPTION,
) -> None:
    """Give a user a new token (printed once); the old one gets 401 from now on.

    Example: conveyor user rotate-token alice --expires-in 90d
    """
    with user_errors():
        user, token = client(ctx).rotate_token(name, expires_in)
    status().print(
        f"New token of '{name}' below, once ({_lifetime(user)}); the old one no longer works"
    )
    _print_token(token)
