"""``conveyor stack ...``"""

from __future__ import annotations

import typer

from conveyor.contracts import ComponentType, StackSpec
from conveyor.service.cli.output import OUTPUT_OPTION, OutputFormat, emit, table, user_errors
from conveyor.service.cli.state import client
from conveyor.workers.flavors import masked_config

app = typer.Typer(help="Stacks: the orchestrator and artifact store a run executes on.")

COMPONENT_ORDER = sorted(ComponentType, key=lambda t: t.value)


def _column(type_: ComponentType) -> str:
    return type_.value.upper()


def stack_json(stack: StackSpec, active: str) -> dict[str, object]:
    return {
        "id": stack.id,
        "name": stack.name,
        "active": stack.name == active,
        "shared": stack.shared,
        "owner": stack.owner,
        "components": {
            t.value: {
                "id": c.id,
                "name": c.name,
                "flavor": c.flavor,
                "config": masked_config(c),
            }
            for t, c in sorted(stack.components.items())
        },
    }


@app.command("list")
def list_stacks(ctx: typer.Context, output: OutputFormat = OUTPUT_OPTION) -> None:
    """List every stack; the active one is marked.

    Example: conveyor stack list --output json
    """
    with user_errors():
        c = client(ctx)
        active = c.active_stack_name()
        stacks = c.list_stacks()

    def render(data: list[dict[str, object]]) -> object:
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
            + [_column(t) for t in COMPONENT_ORDER],
            rows,
        )

    emit(output, [stack_json(s, active) for s in stacks], render)


@app.command("describe")
def describe(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Stack name (default: the active stack)"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Show a stack's components, their flavors and configuration (secrets masked).

    Example: conveyor stack describe default
    """
    with user_errors():
        c = client(ctx)
        active = c.active_stack_name()
        stack = c.get_stack(name)

    def render(_: object) -> list[object]:
        marker = " (ACTIVE)" if stack.name == active else ""
        parts: list[object] = [
            table(
                ["COMPONENT_TYPE", "COMPONENT_NAME"],
                [
                    [_column(t), stack.components[t].name]
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
                    [["flavor", component.flavor], *[[k, v] for k, v in config.items()]],
                    title=f"{_column(t)} '{component.name}'",
                )
            )
        return parts

    emit(output, stack_json(stack, active), render)
