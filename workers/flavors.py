"""Flavors: a name plus a pydantic config model, and how to build the adapter from it.

A new flavor is a new module with its config model and factory, plus one entry here.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import to_jsonable_python

from conveyor.contracts import (
    ComponentSpec,
    ComponentType,
    ConveyorError,
    StackSpec,
    Topology,
    ValidationError,
)
from conveyor.workers.artifact_store_local import LocalArtifactStoreConfig
from conveyor.workers.limits import MAX_ACTIVE_RUNS, MAX_CONCURRENCY, RUNS_PER_SLOT
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.s3_config import S3ArtifactStoreConfig
from conveyor.workers.secrets import mask, mask_value, reveal, secret_keys

# The Protocols are for typing only: importing them builds every event model
# (contracts/events.py), which reading configuration never needs.
if TYPE_CHECKING:
    from conveyor.contracts import ArtifactStore, Broker


class LocalOrchestratorConfig(BaseModel):
    """Configuration of the ``local`` orchestrator flavor."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(
        default=4,
        ge=1,
        le=MAX_CONCURRENCY,
        description="Steps the embedded worker pool runs at once",
    )
    max_active_runs: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ACTIVE_RUNS,
        description="Runs going at once; the runs submitted beyond them wait, queued, and "
        "start in the order they were submitted as others end (default: twice concurrency)",
    )

    @model_validator(mode="after")
    def _default_runs(self) -> LocalOrchestratorConfig:
        # Each slot has a run's ready step at hand when the one before it ends: a chain
        # has one ready step at a time.
        if self.max_active_runs is None:
            self.max_active_runs = RUNS_PER_SLOT * self.concurrency
            # Not stored: it follows concurrency, changed later.
            self.model_fields_set.discard("max_active_runs")
        return self


@dataclass(frozen=True)
class Flavor:
    """One flavor of one component type."""

    component_type: ComponentType
    name: str
    config_model: type[BaseModel]
    description: str
    embedded: bool = False
    one_machine: bool = False
    """Its bytes are in a folder of the machine that uses it: workers on other machines see
    them only through shared storage mounted at the same path."""

    def validate(self, config: dict[str, Any]) -> BaseModel:
        """The typed config, or a ValidationError naming the key and what was expected."""
        try:
            return self.config_model.model_validate(config)
        except PydanticValidationError as exc:
            fields = self.config_model.model_fields
            valid = ", ".join(fields) or "(none)"
            secret = secret_keys(self.config_model)
            problems = []
            for error in exc.errors():
                key = ".".join(str(p) for p in error["loc"]) or "config"
                top = str(error["loc"][0]) if error["loc"] else ""
                if error["type"] == "extra_forbidden":
                    problems.append(f"unknown key {key!r} (valid keys: {valid})")
                elif error["type"] == "missing":
                    problems.append(f"missing key {key!r}")
                else:
                    expected = (
                        f" expects {type_name(fields[top].annotation)}" if top in fields else ""
                    )
                    got = mask_value(top, error.get("input"), secret=top in secret)
                    problems.append(f"key {key!r}{expected}: {error['msg']} (got {got!r})")
            raise ValidationError(
                f"invalid config for {self.component_type.value} flavor {self.name!r}: "
                + "; ".join(problems)
            ) from None

    def normalize(self, config: dict[str, Any]) -> dict[str, Any]:
        """The keys a user set, validated and coerced to their types, secrets in clear.

        Only the keys that were set are kept, so a later default of the flavor applies.
        """
        validated = self.validate(config)
        return dict(to_jsonable_python(reveal(validated.model_dump(exclude_unset=True))))

    def config_keys(self) -> list[ConfigKey]:
        """Each key of the config model: its type, default and description."""
        secret = secret_keys(self.config_model)
        found = []
        for key, field in self.config_model.model_fields.items():
            required = field.is_required()
            default = None if required else field.get_default(call_default_factory=True)
            found.append(
                ConfigKey(
                    key=key,
                    type=type_name(field.annotation),
                    required=required,
                    default=mask_value(
                        key, to_jsonable_python(reveal(default)), secret=key in secret
                    ),
                    description=field.description or "",
                    secret=key in secret,
                )
            )
        return found


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key of a flavor, as ``flavor list`` shows it."""

    key: str
    type: str
    required: bool
    default: Any
    description: str
    secret: bool


def type_name(annotation: Any) -> str:
    """A readable name of a field's type: ``int``, ``str | None``, ``list[str]``."""
    if annotation is None or annotation is type(None):
        return "None"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation))


FLAVORS: dict[tuple[ComponentType, str], Flavor] = {
    (ComponentType.ORCHESTRATOR, "local"): Flavor(
        ComponentType.ORCHESTRATOR,
        "local",
        LocalOrchestratorConfig,
        "Embedded: an in-process broker and worker pool; no set-up.",
        embedded=True,
    ),
    (ComponentType.ORCHESTRATOR, "rabbitmq"): Flavor(
        ComponentType.ORCHESTRATOR,
        "rabbitmq",
        RabbitMQOrchestratorConfig,
        "RabbitMQ: a long-running controller and any number of worker processes.",
    ),
    (ComponentType.ARTIFACT_STORE, "local"): Flavor(
        ComponentType.ARTIFACT_STORE,
        "local",
        LocalArtifactStoreConfig,
        "A directory; shared storage when workers run on several machines.",
        one_machine=True,
    ),
    (ComponentType.ARTIFACT_STORE, "s3"): Flavor(
        ComponentType.ARTIFACT_STORE,
        "s3",
        S3ArtifactStoreConfig,
        "A bucket of AWS S3 or any S3-compatible store (MinIO, R2); for workers anywhere.",
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
    """Every key of the component's config, defaults included, with every secret hidden."""
    flavor = FLAVORS.get((component.type, component.flavor))
    if flavor is None:
        return mask(component.config)
    try:
        validated = flavor.config_model.model_validate(component.config)
    except PydanticValidationError:
        return mask(component.config, secret_keys(flavor.config_model))
    # Revealed first, so that mask() can keep the host of a secret URL visible.
    full = to_jsonable_python(reveal(validated.model_dump()))
    return mask(full, secret_keys(flavor.config_model))


def exported_config(component: ComponentSpec, *, include_secrets: bool = False) -> dict[str, Any]:
    """The keys a user set on the component, secrets hidden unless ``include_secrets``."""
    if include_secrets:
        return dict(component.config)
    flavor = FLAVORS.get((component.type, component.flavor))
    return mask(component.config, secret_keys(flavor.config_model) if flavor else set())


def masked_stack_snapshot(snapshot: dict[str, Any]) -> dict[str, Any]:
    """A run's stack snapshot with the configs of its components shown as ``masked_config``."""
    try:
        stack = StackSpec.model_validate(snapshot)
    except PydanticValidationError:
        return {k: v for k, v in snapshot.items() if k != "components"}
    shown = stack.model_dump(mode="json")
    for type_, component in stack.components.items():
        shown["components"][type_.value]["config"] = masked_config(component)
    return dict(shown)


def run_artifact_store(snapshot: dict[str, Any]) -> ArtifactStore:
    """The artifact store of the stack a run ran on, from the run's stack snapshot."""
    try:
        stack = StackSpec.model_validate(snapshot)
    except PydanticValidationError:
        raise ConveyorError(
            "the run's stack snapshot is unreadable; cannot find its store"
        ) from None
    return make_artifact_store(stack)


# The adapters are imported when one is built: reading and checking configuration (the CLI's
# listings) must not pay for aio-pika, obstore and their logging.


def _local_store(config: BaseModel) -> ArtifactStore:
    from conveyor.workers.artifact_store_local import LocalArtifactStore

    return LocalArtifactStore(LocalArtifactStoreConfig.model_validate(config).path)


def _s3_store(config: BaseModel) -> ArtifactStore:
    from conveyor.workers.artifact_store_s3 import make_s3_store

    return make_s3_store(config)


StoreFactory = Callable[[BaseModel], "ArtifactStore"]
ARTIFACT_STORES: dict[str, StoreFactory] = {
    "local": _local_store,
    "s3": _s3_store,
}


def make_artifact_store(stack: StackSpec) -> ArtifactStore:
    """The artifact store of ``stack``, built from its component's flavor and config."""
    component = stack.component(ComponentType.ARTIFACT_STORE)
    config = get_flavor(component.type, component.flavor).validate(component.config)
    return ARTIFACT_STORES[component.flavor](config)


def _inprocess_broker(stack: StackSpec, config: BaseModel) -> Broker:
    from conveyor.workers.broker_inprocess import InProcessBroker

    return InProcessBroker(Topology(stack=stack.name))


def _rabbitmq_broker(stack: StackSpec, config: BaseModel) -> Broker:
    from conveyor.workers.broker_rabbitmq import RabbitMQBroker

    # Validated by the flavor table already: an instance comes back as it is.
    return RabbitMQBroker.of_stack(stack.name, RabbitMQOrchestratorConfig.model_validate(config))


BrokerFactory = Callable[[StackSpec, BaseModel], "Broker"]
BROKERS: dict[str, BrokerFactory] = {
    "local": _inprocess_broker,
    "rabbitmq": _rabbitmq_broker,
}


def make_broker(stack: StackSpec) -> Broker:
    component = stack.component(ComponentType.ORCHESTRATOR)
    config = get_flavor(component.type, component.flavor).validate(component.config)
    return BROKERS[component.flavor](stack, config)


def orchestrator_config(stack: StackSpec) -> BaseModel:
    component = stack.component(ComponentType.ORCHESTRATOR)
    return get_flavor(component.type, component.flavor).validate(component.config)
