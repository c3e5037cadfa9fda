"""``conveyor worker start``, ``conveyor controller start``, ``conveyor contracts schema``."""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from conveyor.service.cli.output import fail, user_errors
from conveyor.service.cli.state import client
from conveyor.service.home import Home
from conveyor.service.logs import LEVEL_ENV, configure_logging
from conveyor.workers.limits import MAX_CONCURRENCY

if TYPE_CHECKING:
    from conveyor.contracts import StackSpec

# The controller, the worker runtime and the event models are imported by the commands that
# use them: every other command starts faster without them.

worker_app = typer.Typer(help="Worker processes of a rabbitmq stack.", no_args_is_help=True)
controller_app = typer.Typer(
    help="The controller process of a rabbitmq stack.", no_args_is_help=True
)
contracts_app = typer.Typer(
    help="What controllers, workers and other clients agree on.", no_args_is_help=True
)

URL_ENV = "CONVEYOR_AMQP_URL"


class IsolationChoice(enum.StrEnum):
    """The values of ``--isolation`` (contracts.Isolation)."""

    THREAD = "thread"
    PROCESS = "process"


STACK_OPTION = typer.Option(None, "--stack", "-s", help="Stack name (default: the active stack)")
STACK_FILE_OPTION = typer.Option(
    None, "--stack-file", "-f", help="A `conveyor stack export` file instead of --stack"
)
URL_OPTION = typer.Option(
    None, "--url", envvar=URL_ENV, help="Broker URL, replacing the orchestrator's (secrets)"
)


def _service_logging() -> None:
    # A long-running service says what it does unless told otherwise.
    if not os.environ.get(LEVEL_ENV):
        configure_logging("INFO")


def _stack(
    ctx: typer.Context, name: str | None, stack_file: Path | None, url: str | None
) -> StackSpec:
    from conveyor.service.processes import read_stack_file, stack_from_export, with_url

    if name and stack_file:
        fail("give --stack or --stack-file, not both")
    if stack_file is not None:
        return stack_from_export(read_stack_file(stack_file, url))
    found = client(ctx).get_stack(name)
    # The store is not needed any more: a worker speaks only to the broker and the store.
    client(ctx).close()
    return with_url(found, url)


@worker_app.command("start")
def start_worker(
    ctx: typer.Context,
    stack: str = STACK_OPTION,
    stack_file: Path = STACK_FILE_OPTION,
    pool: list[str] = typer.Option(
        [],
        "--pool",
        "-p",
        metavar="POOL",
        help="Worker pool to serve (repeatable; default: 'default')",
    ),
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        "-c",
        min=1,
        max=MAX_CONCURRENCY,
        help="Steps at once (default: the orchestrator's)",
    ),
    grace: float = typer.Option(
        None, "--grace", min=0, help="Seconds running steps may finish after SIGTERM"
    ),
    name: str = typer.Option(None, "--name", help="Worker name shown on steps (default host:pid)"),
    url: str = URL_OPTION,
    trust: list[str] = typer.Option(
        [],
        "--trust",
        metavar="PACKAGE",
        help="An installed package whose @step functions may run without a code archive "
        "(repeatable; adds to the orchestrator's trusted_packages)",
    ),
    isolation: IsolationChoice = typer.Option(
        None,
        "--isolation",
        help="Where sync step bodies run unless their @step says: a thread, or a child "
        "process killed at the step's timeout (default: the orchestrator's)",
    ),
) -> None:
    """Run a worker process: execute the steps of a rabbitmq stack until SIGTERM.

    A worker runs only @step functions: from each run's code archive (the client's source,
    fetched once from the artifact store into CONVEYOR_HOME/cache/code) or from the
    installed packages it trusts; a message naming anything else is dead-lettered. On
    SIGTERM it stops taking steps, lets running ones finish within the grace period, hands
    back the rest, and exits 0. Start as many as wanted, on any machine that reaches the
    broker and the artifact store.

    Exit statuses for a supervisor: 0 after SIGTERM, 3 when it stayed connected without a
    consumer for watchdog_s, 4 when as many step threads are stuck (in sync steps that timed
    out) as its concurrency, 5 when the broker stayed unreachable for reconnect_timeout_s;
    systemd (Restart=on-failure) and Kubernetes replace it.

    Example: conveyor worker start --stack prod --concurrency 4 --pool gpu
    """
    import asyncio

    from conveyor.workers.process import serve_workers

    _service_logging()
    with user_errors():
        home = Home.resolve()
        home.check()  # its code cache: found unusable now, not at the first step
        spec = _stack(ctx, stack, stack_file, url)
        code = asyncio.run(
            serve_workers(
                spec,
                pools=pool,
                concurrency=concurrency,
                grace_s=grace,
                name=name,
                code_cache=home.code_cache,
                trusted=trust,
                isolation=None if isolation is None else isolation.value,
            )
        )
    # A sync step past its grace period still runs in its thread, and the interpreter would
    # wait for it at exit: its StepReady is already handed back, so leave it behind.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@controller_app.command("start")
def start_controller(
    stack: str = STACK_OPTION,
    stack_file: Path = STACK_FILE_OPTION,
    url: str = URL_OPTION,
) -> None:
    """Run the controller of a rabbitmq stack (one per stack) until SIGTERM.

    It takes run requests and step completions, records run state in the metadata store and
    dispatches steps. Restarted, it continues every unfinished run of the stack.

    Example: conveyor controller start --stack prod
    """
    import asyncio

    from conveyor.service.processes import serve_controller

    _service_logging()
    if stack and stack_file:
        fail("give --stack or --stack-file, not both")
    with user_errors():
        sys.path.insert(0, os.getcwd())
        code = asyncio.run(serve_controller(stack=stack, stack_file=stack_file, url=url))
    raise typer.Exit(code)


@contracts_app.command("schema")
def schema(
    event: str = typer.Argument(None, help="Only this event type (e.g. RunRequested)"),
) -> None:
    """Print the JSON Schema of every event (what any AMQP client may publish or read).

    Example: conveyor contracts schema RunRequested
    """
    from conveyor.contracts import event_json_schemas

    schemas = event_json_schemas()
    if event is not None:
        if event not in schemas:
            fail(f"no event type {event!r} (known: {', '.join(schemas)})")
        sys.stdout.write(json.dumps(schemas[event], indent=2) + "\n")
        return
    sys.stdout.write(json.dumps(schemas, indent=2) + "\n")
