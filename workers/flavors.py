"""Flavors: a name plus a pydantic config model, and how to build the adapter from it.

A new flavor is a new module with its config model and factory, plus one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.contracts import (
    ArtifactStore,
    Broker,
    ComponentSpec,
    ComponentType,
    StackSpec,
    Topology,
    ValidationError,
)
from conveyor.workers.artifact_store_local import LocalArtifactStore, LocalArtifactStoreConfig
from conveyor.workers.broker_inprocess import InProcessBroker
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic import ValidationError as PydanticValidationError


class LocalOrchestratorConfig(BaseModel):
    """Configuration of the ``local`` orchestrator flavor."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(
        default=4, ge=1, description="Steps the embedded worker pool runs at once"
    )


@dataclass(frozen=True)
class Flavor:
    """One flavor of one component type."""

    component_type: ComponentType
    name: str
    config_model: type[BaseModel]
    description: str
    embedded: bool = False

    def validate(self, config: dict[str, Any]) -> BaseModel:
        """The typed config, or a ValidationError naming the key and what was expected."""
        try:
            return self.config_model.model_validate(config)
        except PydanticValidationError as exc:
            valid = ", ".join(self.config_model.model_fields) or "(none)"
            problems = []
            for error in exc.errors():
                key = ".".join(str(p) for p in error["loc"]) or "config"
                if error["type"] == "extra_forbidden":
                    problems.append(f"unknown key {key!r} (valid keys: {valid})")
                elif error["type"] == "missing":
                    problems.append(f"missing key {key!r}")
                else:
                    problems.append(f"{key!r}: {error['msg']} (got {error.get('input')!r})")
            raise ValidationError(
                f"invalid config for {self.component_type.value} flavor {self.name!r}: "
                + "; ".join(problems)
            ) from None


FLAVORS: dict[tuple[ComponentType, str], Flavor] = {
    (ComponentType.ORCHESTRATOR, "local"): Flavor(
        ComponentType.ORCHESTRATOR,
        "local",
        LocalOrchestratorConfig,
        "Embedded: an in-process broker and worker pool; no set-up.",
        embedded=True,
    ),
    (ComponentType.ARTIFACT_STORE, "local"): Flavor(
        ComponentType.ARTIFACT_STORE,
        "local",
        LocalArtifactStoreConfig,
        "A directory; shared storage when workers run on several machines.",
    ),
}


def get_flavor(type_: ComponentType, name: str) -> Flavor:
    found = FLAVORS.get((type_, name))
    if found is None:
        names = ", ".join(sorted(n for t, n in FLAVORS if t is type_))
        raise ValidationError(f"unknown {type_.value} flavor {name!r} (available: {names})")
    return found


def flavors_of(type_: ComponentType) -> list[Flavor]:
    return [f for (t, _), f in sorted(FLAVORS.items()) if t is type_]


def masked_config(component: ComponentSpec) -> dict[str, Any]:
    """The component's config with every secret field (and secret in a URL) hidden."""
    flavor = FLAVORS.get((component.type, component.flavor))
    shown: dict[str, Any] = {}
    for key, value in component.config.items():
        field = flavor.config_model.model_fields.get(key) if flavor else None
        if field is not None and field.annotation is SecretStr:
            shown[key] = "********"
        else:
            shown[key] = value
    return shown


def make_artifact_store(stack: StackSpec) -> ArtifactStore:
    component = stack.component(ComponentType.ARTIFACT_STORE)
    config = get_flavor(component.type, component.flavor).validate(component.config)
    assert isinstance(config, LocalArtifactStoreConfig)
    return LocalArtifactStore(config.path)


BrokerFactory = Callable[[StackSpec, BaseModel], Broker]
BROKERS: dict[str, BrokerFactory] = {
    "local": lambda stack, _config: InProcessBroker(Topology(stack=stack.name)),
}


def make_broker(stack: StackSpec) -> Broker:
    component = stack.component(ComponentType.ORCHESTRATOR)
    config = get_flavor(component.type, component.flavor).validate(component.config)
    return BROKERS[component.flavor](stack, config)


def orchestrator_config(stack: StackSpec) -> BaseModel:
    component = stack.component(ComponentType.ORCHESTRATOR)
    return get_flavor(component.type, component.flavor).validate(component.config)
