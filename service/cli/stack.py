"""``conveyor stack ...``"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from conveyor.contracts import ComponentType
from conveyor.service.cli.components import MOVED_ALL_THE_SAME, asking_the_broker, column, shown
from conveyor.service.cli.output import (
    OUTPUT_OPTION,
    YES_OPTION,
    OutputFormat,
    confirm,
    emit,
    fail,
    status,
    table,
    user_errors,
)
from conveyor.service.cli.state import client
from conveyor.service.home import STACK_ENV

# The records, flavors, secrets and probes are imported in the commands that use them:
# building these commands (for `conveyor --help` too) needs none of them.
if TYPE_CHECKING:
    from conveyor.contracts import StackSpec

app = typer.Typer(
    help="Stacks: the orchestrator and artifact store a run executes on.", no_args_is_help=True
)

COMPONENT_ORDER = sorted(ComponentType, key=lambda t: t.value)


@app.command("list")
def list_stacks(ctx: typer.Context, output: OutputFormat = OUTPUT_OPTION) -> None:
    """List every stack; the active one is marked.

    Example: conveyor stack list --output json
    """
    from conveyor.service.public_records import public_stack

    with user_errors():
        c = client(ctx)
        active = c.active_stack_name()
        stacks = c.list_stacks()

    def render(_: object) -> object:
        rows = []
        for stack in stacks:
            rows.append(
                [
                    "👉" if stack.name == active else "",
                    stack.name,
                    stack.id,
                    "✅" if stack.shared else "➖",
                    stack.owner,
                    *[
                        stack.components[t].name if t in stack.components else ""
                        for t in COMPONENT_ORDER
                    ],
                ]
            )
        return table(
            ["ACTIVE", "STACK NAME", "STACK ID", "SHARED", "OWNER"]
            + [column(t) for t in COMPONENT_ORDER],
            rows,
        )

    emit(output, [public_stack(s, active) for s in stacks], render)
    if not stacks and output is OutputFormat.table:
        # Only a server's member can see none: the default stack is the admin's until shared.
        status().print(
            "No stack you may use yet: register your own (conveyor stack register NAME -o "
            "ORCHESTRATOR -a ARTIFACT_STORE), or ask an admin to share one (conveyor stack "
            "share default)."
        )


@app.command("describe")
def describe(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Stack name (default: the active stack)"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Show a stack's components, their flavors and configuration (secrets masked).

    Example: conveyor stack describe default
    """
    import asyncio

    from conveyor.service.public_records import public_stack
    from conveyor.workers.flavors import masked_config
    from conveyor.workers.secrets import mask_urls
    from conveyor.workers.stack_probes import probe_stack

    with user_errors():
        c = client(ctx)
        active = c.active_stack_name()
        stack = c.get_stack(name)
    probes = asyncio.run(probe_stack(stack))
    note = _one_machine_note(stack)

    def render(_: object) -> list[object]:
        marker = " (ACTIVE)" if stack.name == active else ""
        parts: list[object] = [
            table(
                ["COMPONENT_TYPE", "COMPONENT_NAME"],
                [
                    [column(t), stack.components[t].name]
                    for t in COMPONENT_ORDER
                    if t in stack.components
                ],
                title="Stack Configuration",
                caption=f"'{stack.name}' stack{marker}",
            ),
            f"Stack '{stack.name}' with id '{stack.id}' is owned by user {stack.owner} and is "
            f"'{'shared' if stack.shared else 'private'}'.",
        ]
        for t in COMPONENT_ORDER:
            if t not in stack.components:
                continue
            component = stack.components[t]
            config = masked_config(component)
            parts.append(
                table(
                    ["KEY", "VALUE"],
                    [["flavor", component.flavor], *[[k, shown(v)] for k, v in config.items()]],
                    title=f"{column(t)} '{component.name}'",
                )
            )
        parts.append(
            table(
                ["COMPONENT_TYPE", "REACHABLE", "DETAIL"],
                [
                    [column(t), "yes" if probe.ok else "NO", mask_urls(probe.detail)]
                    for t, probe in sorted(probes.items())
                ],
                title="Reachability",
            )
        )
        if note:
            parts.append(note)
        return parts

    # The stack's record, as `stack list` and the API show it, and what the probes found.
    shown_json = public_stack(stack, active).model_dump(mode="json")
    shown_json["reachability"] = {
        t.value: {"ok": probe.ok, "detail": mask_urls(probe.detail)}
        for t, probe in sorted(probes.items())
    }
    emit(output, shown_json, render)


def _one_machine_note(stack: StackSpec) -> str | None:
    """A note when the workers of ``stack`` run apart from the client (not embedded) and its
    artifact store is a folder of one machine: workers elsewhere cannot reach it."""
    from conveyor.workers.flavors import get_flavor

    orchestrator = stack.components.get(ComponentType.ORCHESTRATOR)
    store = stack.components.get(ComponentType.ARTIFACT_STORE)
    if orchestrator is None or store is None:
        return None
    if get_flavor(orchestrator.type, orchestrator.flavor).embedded:
        return None
    if not get_flavor(store.type, store.flavor).one_machine:
        return None
    return (
        f"Note: artifact store '{store.name}' is a folder of this machine: workers on other "
        "machines cannot reach it (unless it is shared storage at the same path); for them, "
        "use an s3 artifact store (docs/scale-out.md)."
    )


def _components_table(stack: StackSpec, active: str) -> object:
    marker = " (ACTIVE)" if stack.name == active else ""
    return table(
        ["COMPONENT_TYPE", "COMPONENT_NAME"],
        [[column(t), stack.components[t].name] for t in COMPONENT_ORDER if t in stack.components],
        caption=f"'{stack.name}' stack{marker}",
    )


def _chosen(orchestrator: str | None, artifact_store: str | None) -> dict[ComponentType, str]:
    chosen = {
        ComponentType.ORCHESTRATOR: orchestrator,
        ComponentType.ARTIFACT_STORE: artifact_store,
    }
    return {t: name for t, name in chosen.items() if name}


def _note_env_override(name: str) -> None:
    override = os.environ.get(STACK_ENV)
    if override and override != name:
        status().print(f"Note: ${STACK_ENV}={override} overrides the active stack in this shell.")


def _asking(stack: StackSpec, otherwise: str) -> AbstractContextManager[None]:
    return asking_the_broker(
        stack.component(ComponentType.ORCHESTRATOR), f"stack '{stack.name}'", otherwise
    )


ORCHESTRATOR_OPTION = typer.Option(
    None, "--orchestrator", "-o", help="Name of the orchestrator (conveyor orchestrator list)"
)
ARTIFACT_STORE_OPTION = typer.Option(
    None, "--artifact-store", "-a", help="Name of the artifact store (conveyor artifact-store list)"
)


@app.command("register")
def register(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Name of the new stack"),
    orchestrator: str = ORCHESTRATOR_OPTION,
    artifact_store: str = ARTIFACT_STORE_OPTION,
    set_active: bool = typer.Option(False, "--set", help="Make it the active stack"),
    share: bool = typer.Option(
        False, "--share", help="Let every user of the server see and use it (and its components)"
    ),
) -> None:
    """Register a stack made of existing components, owned by you (private unless --share).

    Example: conveyor stack register shared -o default -a nfs --set
    """
    with user_errors():
        c = client(ctx)
        stack = c.register_stack(
            name, _chosen(orchestrator, artifact_store), activate=set_active, shared=share
        )
        active = c.active_stack_name()
    status().print(f"Registered stack '{stack.name}'.")
    status().print(_components_table(stack, active))
    note = _one_machine_note(stack)
    if note:
        status().print(note)
    if set_active:
        status().print(f"Active stack set to '{stack.name}'.")
        _note_env_override(stack.name)


def _share(ctx: typer.Context, name: str, shared: bool) -> None:
    with user_errors():
        stack = client(ctx).share_stack(name, shared)
    if shared:
        status().print(f"Stack '{stack.name}' is shared: every user may see and use it.")
    else:
        status().print(f"Stack '{stack.name}' is private: only {stack.owner} and admins see it.")


@app.command("share")
def share(
    ctx: typer.Context, name: str = typer.Argument(..., help="Name or id of the stack")
) -> None:
    """Share a stack, and its components, with every user (owner or admin only).

    Example: conveyor stack share team-gpu
    """
    _share(ctx, name, True)


@app.command("unshare")
def unshare(
    ctx: typer.Context, name: str = typer.Argument(..., help="Name or id of the stack")
) -> None:
    """Make a shared stack private again (owner or admin only).

    Its components stay shared: other stacks may use them.

    Example: conveyor stack unshare team-gpu
    """
    _share(ctx, name, False)


@app.command("set")
def set_active(
    ctx: typer.Context, name: str = typer.Argument(..., help="Name or id of the stack")
) -> None:
    """Make a stack the active stack of this client (saved in CONVEYOR_HOME).

    Example: conveyor stack set shared
    """
    with user_errors():
        stack = client(ctx).activate_stack(name)
    status().print(f"Active stack set to '{stack.name}'.")
    _note_env_override(stack.name)


@app.command("get")
def get_active(ctx: typer.Context, output: OutputFormat = OUTPUT_OPTION) -> None:
    """Print the active stack, and whether $CONVEYOR_STACK chose it.

    Example: conveyor stack get
    """
    with user_errors():
        stack = client(ctx).get_stack()
    source = f"${STACK_ENV}" if os.environ.get(STACK_ENV) else "this client"
    emit(
        output,
        {"name": stack.name, "id": stack.id, "chosen_by": source},
        lambda _: f"The active stack is '{stack.name}' (chosen by {source}).",
    )


@app.command("update")
def update(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Name or id of the stack"),
    orchestrator: str = ORCHESTRATOR_OPTION,
    artifact_store: str = ARTIFACT_STORE_OPTION,
) -> None:
    """Replace components of a stack; past runs keep the components they ran on.

    Example: conveyor stack update shared -a nfs
    """
    with user_errors():
        c = client(ctx)
        with _asking(c.get_stack(name), MOVED_ALL_THE_SAME):
            stack = c.update_stack(name, _chosen(orchestrator, artifact_store))
        active = c.active_stack_name()
    status().print(f"Updated stack '{stack.name}'.")
    status().print(_components_table(stack, active))


@app.command("rename")
def rename(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Current name of the stack"),
    new_name: str = typer.Argument(..., help="New name"),
) -> None:
    """Rename a stack; it stays active if it was, and keeps its runs.

    A stack on a broker is renamed only while its controller and workers are stopped: its
    queues carry its name.

    Example: conveyor stack rename shared team
    """
    from conveyor.workers.flavors import get_flavor

    with user_errors():
        c = client(ctx)
        with _asking(c.get_stack(name), "it is not renamed"):
            stack = c.rename_stack(name, new_name)
    status().print(f"Renamed stack '{name}' to '{stack.name}'.")
    orchestrator = stack.component(ComponentType.ORCHESTRATOR)
    if not get_flavor(orchestrator.type, orchestrator.flavor).embedded:
        status().print(
            f"Start its controller and workers with --stack {stack.name} (workers started "
            "from a stack file: export it again)."
        )


@app.command("copy")
def copy(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="Stack to copy"),
    target: str = typer.Argument(..., help="Name of the new stack"),
) -> None:
    """Register a new stack with the same components as another.

    Example: conveyor stack copy default experiments
    """
    with user_errors():
        stack = client(ctx).copy_stack(source, target)
    status().print(f"Copied stack '{source}' to '{stack.name}'.")


@app.command("delete")
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Name or id of the stack"),
    yes: bool = YES_OPTION,
) -> None:
    """Delete a stack (not its components, not its runs); never the default or active one.

    Example: conveyor stack delete experiments -y
    """
    otherwise = "it can be deleted all the same, leaving its queues on the broker"
    with user_errors():
        c = client(ctx)
        stack = c.get_stack(name)
        if not yes:
            # Asked only before a question: delete_stack checks the same, and a broker that
            # does not answer would be waited for twice.
            with _asking(stack, otherwise):
                stack = c.deletable_stack(name)
            confirm(f"Delete stack '{stack.name}'? Its components are kept.", yes)
        with _asking(stack, otherwise):
            c.delete_stack(stack.name)
    status().print(f"Deleted stack '{stack.name}'.")


@app.command("export")
def export(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Name or id of the stack"),
    file: str = typer.Argument(None, help="YAML file to write (default, or -: stdout)"),
    include_secrets: bool = typer.Option(
        False,
        "--include-secrets",
        help="Write secrets in clear; without it they are masked and an import needs them "
        "registered first",
    ),
) -> None:
    """Write a stack and its components' configuration as YAML (secrets masked).

    Example: conveyor stack export shared > shared.yaml
    """
    import yaml  # here, not for every command

    with user_errors():
        data = client(ctx).export_stack(name, include_secrets=include_secrets)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if file is None or file == "-":
        sys.stdout.write(text)
        return
    target = Path(file)
    try:
        _write(target, text, private=include_secrets)
    except OSError as exc:
        fail(f"cannot write {target}: {exc.strerror or exc}")
    masked = "secrets in clear" if include_secrets else "secrets masked"
    status().print(f"Exported stack '{data['stack_name']}' to {target} ({masked}).")


def _write(target: Path, text: str, *, private: bool) -> None:
    if private:
        # Secrets in clear: readable by their owner only, from the moment the file exists.
        target.unlink(missing_ok=True)
        with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(text)
    else:
        target.write_text(text)


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="YAML file written by conveyor stack export"),
    name: str = typer.Option(None, "--name", "-n", help="Stack name (default: the file's)"),
) -> None:
    """Register a stack from an exported YAML file, creating the components that do not exist.

    Example: conveyor stack import shared.yaml --name shared-copy
    """
    from conveyor.service.stack_files import read_export_file

    with user_errors():
        data = read_export_file(file)
        c = client(ctx)
        before = {x.id for x in c.list_components()}
        stack = c.import_stack(data, name=name)
    status().print(f"Imported stack '{stack.name}'.")
    exported = data.get("components", {}) if isinstance(data, dict) else {}
    for type_ in COMPONENT_ORDER:
        component = stack.components.get(type_)
        if component is None:
            continue
        how = "created" if component.id not in before else "reused"
        line = f"  {column(type_)} '{component.name}': {how}"
        original = exported.get(type_.value, {}).get("name")
        if original and original != component.name:
            line += f" ('{original}' exists with a different configuration)"
        status().print(line)
