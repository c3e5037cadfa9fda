"""``conveyor server up``: the HTTP API and dashboard, plus the active stack's controller."""

from __future__ import annotations

import errno
import signal
import socket
from pathlib import Path
from types import FrameType

import typer

from conveyor.contracts.limits import DEFAULT_MAX_STEPS
from conveyor.service.bind_checks import check_bind, check_token, server_token
from conveyor.service.cli.output import fail, status, user_errors
from conveyor.workers.heap import settle_after_start

app = typer.Typer(help="The HTTP API and the dashboard.")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8237
GRACEFUL_SHUTDOWN_S = 10


def _after_shutdown(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal it stopped on once it is done; by then we exit 0."""


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound as uvicorn binds one, before anything is printed or
    started: a busy port is one line, and cannot be taken between a check and the bind."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(f"cannot listen on {host}:{port}: the port is in use; choose another with --port")
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


@app.command("up")
def up(
    ctx: typer.Context,
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on"),
    port: int = typer.Option(
        DEFAULT_PORT, "--port", min=0, max=65535, help="Port to listen on (0: any free one)"
    ),
    stack: str = typer.Option(
        None, "--stack", "-s", help="Stack whose controller to run (default: the active stack)"
    ),
    allowed_hosts: list[str] = typer.Option(
        [],
        "--allowed-host",
        metavar="NAME",
        help="A name the server is reached by, besides localhost and IP addresses (repeatable)",
    ),
    pipelines: Path = typer.Option(
        None,
        "--pipelines",
        exists=True,
        file_okay=False,
        help="Folder whose .py files requests may name as pipelines (default: this folder)",
    ),
    trust: list[str] = typer.Option(
        [],
        "--trust",
        metavar="PACKAGE",
        help="Top-level package whose modules requests may name as pipelines (repeatable)",
    ),
    max_steps: int = typer.Option(
        DEFAULT_MAX_STEPS, "--max-steps", min=1, help="The most steps a submitted pipeline has"
    ),
    max_code_mb: float = typer.Option(
        50.0,
        "--max-code-mb",
        min=0.001,
        max=1024,
        help="The largest code archive a logged-in client may upload with its run",
    ),
) -> None:
    """Serve the API and dashboard, and run the stack's controller (on an embedded stack).

    The first start creates the admin user, 'default', and prints its token once (or takes
    it from $CONVEYOR_ADMIN_TOKEN). Beyond 127.0.0.1 it needs that token set (16 characters
    or more), and then every request needs a user's token; on 127.0.0.1 without it, a
    request without a token acts as the admin, as on a single-user machine.
    Requests may run pipelines from files under --pipelines and modules of --trust
    packages only (see docs/server.md).

    Example: conveyor server up --port 8237 --pipelines ./pipelines
    """
    token = server_token()
    with user_errors():
        check_bind(host, token)
        check_token(token)
    # Bound before the web stack is imported (a second): a refused bind is refused at once.
    sock = listening_socket(host, port)
    # Imported here: the web stack would slow every other command down.
    import uvicorn

    from conveyor.service.api.app import create_app
    from conveyor.service.client import Client

    with user_errors():
        # The server always works on its own home's store, even if that home is logged in.
        with Client.local() as c:
            served = c.get_stack(stack)
            home = c.home
            created = c.bootstrap_admin(token)
        app = create_app(
            home,
            stack=served.name,
            token=token,
            allowed_hosts=allowed_hosts,
            pipelines=pipelines,
            trusted_packages=trust,
            max_steps=max_steps,
            max_code_bytes=int(max_code_mb * (1 << 20)),
        )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    if created is not None:
        # Shown once, here: the store keeps only its digest.
        status().print(
            f"Created the admin user 'default'. Its token, shown only now: {created}\n"
            "Keep it in a password manager; log in with: conveyor login URL --token TOKEN"
        )
    shown_host = f"[{host}]" if ":" in host else host
    status().print(
        f"Conveyor server on http://{shown_host}:{sock.getsockname()[1]} (stack "
        f"'{served.name}'{', token required' if token else ''}); Ctrl+C to stop"
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _after_shutdown)
    settle_after_start()
    server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(1)
    status().print("Conveyor server stopped")
