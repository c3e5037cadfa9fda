"""``conveyor orchestrator ...`` and ``conveyor artifact-store ...``, made by one function.

Configuration is given as ``--key=value`` (or ``--key value``) options that the command does
not declare: click hands them over in ``ctx.args`` and they are checked against the flavor's
config model by the service.
"""

from __future__ import annotations

import json
import types
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

import typer

from conveyor.contracts.enums import ComponentType, label
from conveyor.service.cli.output import (
    OUTPUT_OPTION,
    YES_OPTION,
    OutputFormat,
    confirm,
    emit,
    fail,
    noted_if_slow,
    status,
    table,
    user_errors,
    when,
)
from conveyor.service.cli.state import client

if TYPE_CHECKING:
    from pydantic import BaseModel

    from conveyor.contracts import ComponentSpec
    from conveyor.service.public_records import ComponentView
    from conveyor.workers.flavors import Flavor

# The records, flavors and pydantic are imported in the commands that use them: building
# these commands (for `conveyor --help` too) needs none of them.

ORCHESTRATOR = ComponentType.ORCHESTRATOR
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@dataclass(frozen=True)
class ComponentCommand:
    """How one component type appears on the command line, with examples for its help."""

    type: ComponentType
    command: str
    example: str  # a component name used in the examples
    register_example: str
    update_example: str
    delete_note: str  # what a delete keeps, in its question


COMMANDS = (
    ComponentCommand(
        ComponentType.ORCHESTRATOR,
        "orchestrator",
        "fast",
        "--flavor local --concurrency=8",
        "--concurrency=2",
        "Past runs keep its configuration.",
    ),
    ComponentCommand(
        ComponentType.ARTIFACT_STORE,
        "artifact-store",
        "nfs",
        "--flavor local --path=/mnt/artifacts",
        "--path=/srv/artifacts",
        "The artifacts in it are kept.",
    ),
)


def column(type_: ComponentType) -> str:
    """The column or row header of a component type: ARTIFACT_STORE."""
    return type_.value.upper()


def shown(value: Any) -> str:
    """A config value in a table cell: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _is_text(annotation: Any) -> bool:
    from pydantic import SecretStr

    if annotation in (str, SecretStr, Path):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_text(a) for a in args)
    return False


def _value(raw: str, field_type: Any) -> Any:
    # `null` removes a key on update; text fields keep digits as text (a password "1234").
    if raw == "null":
        return None
    if field_type is not None and _is_text(field_type):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_config(args: list[str], model: type[BaseModel] | None) -> dict[str, Any]:
    """``--key=value`` and ``--key value`` pairs; values are JSON when they parse as JSON."""
    fields = model.model_fields if model is not None else {}
    config: dict[str, Any] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--") or arg == "--":
            fail(f"unexpected argument {arg!r}: give configuration as --key=value")
        key, sep, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        field = fields.get(key)
        if not sep and rest and not rest[0].startswith("--"):
            raw = rest.pop(0)
        elif not sep:
            # A bare --key is true for a yes/no key only: --concurrency alone is not 1.
            if field is not None and not _is_bool(field.annotation):
                fail(f"--{key} needs a value: --{key}=VALUE")
            raw = "true"
        value = _value(raw, field.annotation if field is not None else None)
        extra = field.json_schema_extra if field is not None else None
        if isinstance(extra, dict) and extra.get("client_path") and isinstance(value, str):
            value = _absolute(value)
        config[key] = value
    return config


def _absolute(path: str) -> str:
    """A path typed here, made absolute here: a server would resolve it in its own working
    directory. What the key's own check refuses is left for it to refuse."""
    if not path.strip() or any(ord(c) < 32 for c in path):
        return path
    return str(Path(path).expanduser().resolve())


def _is_bool(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_bool(a) for a in get_args(annotation))
    return annotation is bool


def asking_the_broker(
    orchestrator: ComponentSpec, stacks: str, otherwise: str
) -> AbstractContextManager[None]:
    """While a change asks a rabbitmq ``orchestrator``'s broker whether anything consumes the
    queues of ``stacks``: what it waits for and what is done ``otherwise``, said once the
    broker is slow to answer (a port nothing listens on refuses at once; a host that drops
    the packets is waited for)."""
    from conveyor.workers.stack_probes import PROBE_TIMEOUT_S, broker_address

    where = broker_address(orchestrator) if orchestrator.type is ORCHESTRATOR else None
    if where is None:
        return nullcontext()
    return noted_if_slow(
        f"Waiting for RabbitMQ at {where} to answer (at most {PROBE_TIMEOUT_S:g}s): does "
        f"anything still consume the queues of {stacks}? Without an answer, {otherwise}."
    )


MOVED_ALL_THE_SAME = "the change is made all the same and the old queues stay on the broker"


def _config_table(config: dict[str, Any]) -> object:
    """A masked configuration as a table."""
    rows = [[key, shown(value)] for key, value in config.items()]
    return table(["KEY", "VALUE"], rows or [["(no configuration)", ""]], title="Configuration")


def _describe(component: ComponentView) -> list[object]:
    marker = " (ACTIVE)" if component.active else ""
    properties = table(
        ["COMPONENT_PROPERTY", "VALUE"],
        [
            ["NAME", component.name],
            ["COMPONENT ID", component.id],
            ["TYPE", column(component.type)],
            ["FLAVOR", component.flavor],
            ["SHARED", "✅" if component.shared else "➖"],
            ["OWNER", component.owner],
            ["CREATED", when(component.created)],
            ["STACKS", ", ".join(component.stacks) or "(none)"],
        ],
        title=f"{column(component.type)} '{component.name}'",
        caption=f"'{component.name}' {label(component.type)}{marker}",
    )
    return [properties, _config_table(component.config)]


def _flavor_table(flavor: Flavor) -> object:
    rows = [
        [
            key.key,
            f"{key.type} (secret)" if key.secret and "Secret" not in key.type else key.type,
            "(required)" if key.required else json.dumps(key.default),
            key.description,
        ]
        for key in flavor.config_keys()
    ]
    return table(
        ["KEY", "TYPE", "DEFAULT", "DESCRIPTION"],
        rows or [["(no configuration)", "", "", ""]],
        title=f"{label(flavor.component_type)} flavor '{flavor.name}'",
        caption=flavor.description,
    )


def component_app(spec: ComponentCommand) -> typer.Typer:
    """The sub-command of one component type: list, register, describe, update, ..."""
    type_, kind, ex = spec.type, label(spec.type), spec.example
    cmd = f"conveyor {spec.command}"
    app = typer.Typer(
        help=f"Manage {kind}s, the {kind} components of stacks.", no_args_is_help=True
    )
    flavor_app = typer.Typer(help=f"Flavors an {kind} can have.", no_args_is_help=True)
    app.add_typer(flavor_app, name="flavor")

    @app.command(
        "list",
        help=f"List every {kind}; ACTIVE marks the one in the active stack.\n\n"
        f"Example: {cmd} list --output json",
    )
    def list_components(
        ctx: typer.Context,
        stack: str = typer.Option(
            None, "--stack", "-s", help="Mark this stack's (default: active)"
        ),
        output: OutputFormat = OUTPUT_OPTION,
    ) -> None:
        from conveyor.service.public_records import public_component

        with user_errors():
            c = client(ctx)
            # The active stack's name only: a member's may be one they cannot see (yet).
            marked = c.get_stack(stack).name if stack else c.active_stack_name()
            stacks = c.list_stacks()
            components = [public_component(x, stacks, marked) for x in c.list_components(type_)]
        emit(
            output,
            components,
            lambda _: table(
                ["ACTIVE", "NAME", "COMPONENT ID", "FLAVOR", "SHARED", "OWNER"],
                [
                    [
                        "👉" if x.active else "",
                        x.name,
                        x.id,
                        x.flavor,
                        "✅" if x.shared else "➖",
                        x.owner,
                    ]
                    for x in components
                ],
            ),
        )

    @app.command(
        "register",
        context_settings=EXTRA_ARGS,
        help=f"Register a new {kind} of a flavor, configured with --key=value options.\n\n"
        f"Example: {cmd} register {ex} {spec.register_example}",
    )
    def register(
        ctx: typer.Context,
        name: str = typer.Argument(..., help=f"Name of the new {kind}"),
        flavor: str = typer.Option(..., "--flavor", "-f", help=f"See: {cmd} flavor list"),
        share: bool = typer.Option(
            False, "--share", help=f"Let every user of the server see and use the {kind}"
        ),
    ) -> None:
        from conveyor.workers.flavors import FLAVORS, masked_config

        found = FLAVORS.get((type_, flavor))
        config = parse_config(ctx.args, found.config_model if found else None)
        with user_errors():
            component = client(ctx).register_component(type_, name, flavor, config, share)
        status().print(f"Registered {kind} '{component.name}' (flavor {component.flavor}).")
        status().print(_config_table(masked_config(component)))

    @app.command(
        "describe",
        help=f"Show an {kind}: flavor, configuration with defaults (secrets masked), stacks.\n\n"
        f"Example: {cmd} describe {ex}",
    )
    def describe(
        ctx: typer.Context,
        name: str = typer.Argument(..., help=f"Name or id of the {kind}"),
        output: OutputFormat = OUTPUT_OPTION,
    ) -> None:
        from conveyor.service.public_records import public_component

        with user_errors():
            c = client(ctx)
            shown = public_component(
                c.get_component(type_, name), c.list_stacks(), c.active_stack_name()
            )
        emit(output, shown, _describe)

    @app.command(
        "update",
        context_settings=EXTRA_ARGS,
        help=f"Change configuration keys of an {kind} (--key=null resets a key to its default)."
        f"\n\nExample: {cmd} update {ex} {spec.update_example}",
    )
    def update(
        ctx: typer.Context, name: str = typer.Argument(..., help=f"Name or id of the {kind}")
    ) -> None:
        from conveyor.workers.flavors import FLAVORS, masked_config

        with user_errors():
            c = client(ctx)
            current = c.get_component(type_, name)
            found = FLAVORS.get((type_, current.flavor))
            config = parse_config(ctx.args, found.config_model if found else None)
            # Another broker, virtual host or prefix moves the queues of its stacks.
            with asking_the_broker(current, "the stacks that use it", MOVED_ALL_THE_SAME):
                component = c.update_component(type_, current.name, config)
        status().print(f"Updated {kind} '{component.name}'.")
        status().print(_config_table(masked_config(component)))

    @app.command(
        "rename",
        help=f"Rename an {kind}; the stacks that use it follow.\n\n"
        f"Example: {cmd} rename {ex} {ex}-2",
    )
    def rename(
        ctx: typer.Context,
        name: str = typer.Argument(..., help=f"Current name of the {kind}"),
        new_name: str = typer.Argument(..., help="New name"),
    ) -> None:
        with user_errors():
            component = client(ctx).rename_component(type_, name, new_name)
        status().print(f"Renamed {kind} '{name}' to '{component.name}'.")

    def set_shared(ctx: typer.Context, name: str, shared: bool) -> None:
        with user_errors():
            component = client(ctx).share_component(type_, name, shared)
        state = "shared: every user may use it" if shared else "private"
        status().print(f"{kind.capitalize()} '{component.name}' is {state}.")

    @app.command(
        "share",
        help=f"Share an {kind} with every user (owner or admin only).\n\nExample: {cmd} share {ex}",
    )
    def share(
        ctx: typer.Context, name: str = typer.Argument(..., help=f"Name or id of the {kind}")
    ) -> None:
        set_shared(ctx, name, True)

    @app.command(
        "unshare",
        help=f"Make an {kind} private again (owner or admin only).\n\nExample: {cmd} unshare {ex}",
    )
    def unshare(
        ctx: typer.Context, name: str = typer.Argument(..., help=f"Name or id of the {kind}")
    ) -> None:
        set_shared(ctx, name, False)

    @app.command(
        "delete", help=f"Delete an {kind} that no stack uses.\n\nExample: {cmd} delete {ex} -y"
    )
    def delete(
        ctx: typer.Context,
        name: str = typer.Argument(..., help=f"Name or id of the {kind}"),
        yes: bool = YES_OPTION,
    ) -> None:
        with user_errors():
            c = client(ctx)
            component = c.deletable_component(type_, name)
            confirm(f"Delete {kind} '{component.name}'? {spec.delete_note}", yes)
            c.delete_component(type_, component.name)
        status().print(f"Deleted {kind} '{component.name}'.")

    @flavor_app.command(
        "list",
        help=f"List the {kind} flavors with their configuration keys, types and defaults.\n\n"
        f"Example: {cmd} flavor list",
    )
    def list_flavors(ctx: typer.Context, output: OutputFormat = OUTPUT_OPTION) -> None:
        from conveyor.service.public_records import flavor_info

        with user_errors():
            flavors = client(ctx).list_flavors(type_)
        emit(
            output,
            [flavor_info(f) for f in flavors],
            lambda _: [_flavor_table(f) for f in flavors],
        )

    return app
