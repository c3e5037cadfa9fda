"""Records as they leave Conveyor: one shape each for the CLI's ``--output json`` and the HTTP
API, every configuration masked.

Runs, steps and artifacts leave as their contract models (a run's stack snapshot masked, the
folder of its spec for those who may retry it only);
stacks, components and flavors as the views below, which add what a reader needs beside the
record (is it the active stack, which stacks use a component). Every stack, component and run
snapshot is masked here, so the masking rule (``workers.flavors.masked_config``) is applied in
one place. Nothing here imports the web framework: the CLI imports this module too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from conveyor.contracts import ComponentSpec, ComponentType, RunRecord, StackSpec
from conveyor.workers.flavors import Flavor, masked_config, masked_stack_snapshot

if TYPE_CHECKING:
    from conveyor.contracts import PipelineSpec  # its models are for `run describe` only
    from conveyor.service.users import Actor


class StackView(StackSpec):
    """A stack with its configuration masked, and whether it is the active one."""

    active: bool = False


class ComponentView(ComponentSpec):
    """A component with its configuration masked (defaults shown, secrets hidden), whether
    the active stack uses it, and the stacks that do."""

    active: bool = False
    stacks: list[str] = Field(default_factory=list)


class FlavorKey(BaseModel):
    """One configuration key of a flavor."""

    key: str
    type: str
    required: bool
    default: Any = None
    description: str = ""
    secret: bool = False


class FlavorInfo(BaseModel):
    """A flavor of a component type and the configuration it takes."""

    type: ComponentType
    name: str
    description: str
    embedded: bool
    keys: list[FlavorKey]


def public_run(run: RunRecord) -> RunRecord:
    """``run`` with the configuration in its stack snapshot masked."""
    return run.model_copy(update={"stack_snapshot": masked_stack_snapshot(run.stack_snapshot)})


def public_spec(spec: PipelineSpec, run: RunRecord, reader: Actor) -> PipelineSpec:
    """The spec of ``run`` as ``reader`` gets it. The folder it was compiled in is a path on
    its submitter's machine, there for a retry to compile it in again: only those who may
    retry the run (its submitter, an admin) get it; every other user sees every run's spec,
    and a path such as /home/alice/acme-churn is not theirs to read."""
    if reader.may_change(run.user):
        return spec
    return spec.model_copy(update={"folder": None})


def masked_component(component: ComponentSpec) -> ComponentSpec:
    """``component`` with its configuration masked (defaults shown, secrets hidden)."""
    return component.model_copy(update={"config": masked_config(component)})


def public_stack(stack: StackSpec, active: str) -> StackView:
    """``stack`` with every component masked, and whether it is the stack named ``active``."""
    data = stack.model_dump()
    data["components"] = {t: masked_component(c) for t, c in stack.components.items()}
    return StackView(**data, active=stack.name == active)


def public_component(
    component: ComponentSpec, stacks: Sequence[StackSpec], active: str
) -> ComponentView:
    """``component`` masked, with the names of ``stacks`` that use it, and whether the one
    named ``active`` does."""
    users = [s for s in stacks if any(c.id == component.id for c in s.components.values())]
    return ComponentView(
        **masked_component(component).model_dump(),
        active=any(s.name == active for s in users),
        stacks=[s.name for s in users],
    )


def flavor_info(flavor: Flavor) -> FlavorInfo:
    """A flavor and each key of its configuration."""
    return FlavorInfo(
        type=flavor.component_type,
        name=flavor.name,
        description=flavor.description,
        embedded=flavor.embedded,
        keys=[
            FlavorKey(
                key=k.key,
                type=k.type,
                required=k.required,
                default=k.default,
                description=k.description,
                secret=k.secret,
            )
            for k in flavor.config_keys()
        ],
    )
