"""The controller process of a service stack, and stacks read from an export file.

A worker needs no metadata store: ``worker start --stack-file prod.yaml`` reads the
stack from a ``stack export``. The controller owns the store, so a stack file given to it
is imported there first (or the stack of that name is used).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from conveyor.contracts import ComponentSpec, ComponentType, StackSpec, ValidationError
from conveyor.service.context import Services
from conveyor.service.controller import Controller
from conveyor.service.home import Home
from conveyor.service.stack_files import parse_export, read_export_file
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.flavors import get_flavor, make_artifact_store
from conveyor.workers.heap import settle_after_start
from conveyor.workers.loggers import get_logger
from conveyor.workers.process import (
    EXIT_OK,
    Signals,
    rabbitmq_config,
    wait_for_stop,
    watchdog_of,
)
from conveyor.workers.secrets import masked_paths

log = get_logger("conveyor.process")


def read_stack_file(path: Path, url: str | None = None) -> dict[str, Any]:
    """The export in ``path`` as data, with the orchestrator's URL replaced by ``url``."""
    export = parse_export(read_export_file(path))
    orchestrator = export.components.get(ComponentType.ORCHESTRATOR)
    if url and orchestrator is not None:
        orchestrator.configuration["url"] = url
    for type_, component in export.components.items():
        masked = masked_paths(component.configuration)
        if masked:
            raise ValidationError(
                f"stack file {path}: the {type_.value} {component.name!r} was exported with "
                f"its secrets masked ({', '.join(masked)}): export with --include-secrets, "
                "or give the broker URL with --url (or $CONVEYOR_AMQP_URL)"
            )
    return export.model_dump(mode="json")


def stack_from_export(data: dict[str, Any]) -> StackSpec:
    """A StackSpec straight from an export (for processes that have no metadata store)."""
    export = parse_export(data)
    components = {}
    for type_, exported in export.components.items():
        get_flavor(type_, exported.flavor).validate(exported.configuration)
        components[type_] = ComponentSpec(
            id=f"file:{type_.value}:{exported.name}",
            type=type_,
            name=exported.name,
            flavor=exported.flavor,
            config=exported.configuration,
        )
    return StackSpec(id=f"file:{export.stack_name}", name=export.stack_name, components=components)


def with_url(stack: StackSpec, url: str | None) -> StackSpec:
    """``stack`` with its orchestrator's broker URL replaced (not stored anywhere)."""
    if not url:
        return stack
    orchestrator = stack.component(ComponentType.ORCHESTRATOR)
    changed = orchestrator.model_copy(update={"config": {**orchestrator.config, "url": url}})
    return stack.model_copy(
        update={"components": {**stack.components, ComponentType.ORCHESTRATOR: changed}}
    )


async def controller_stack(
    services: Services, name: str | None, stack_file: Path | None, url: str | None
) -> StackSpec:
    """The stack a controller drives: by name, or from a file (imported on first use)."""
    if stack_file is None:
        return with_url(await services.stacks.resolve(name), url)
    data = read_stack_file(stack_file, url)
    stack_name = name or str(data["stack_name"])
    existing = await services.stacks.store.stack(stack_name)
    if existing is None:
        existing = await services.stacks.import_stack(data, stack_name)
        log.info("stack imported from file", stack=stack_name, file=str(stack_file))
    return with_url(existing, url)


async def serve_controller(
    *,
    stack: str | None = None,
    stack_file: Path | None = None,
    url: str | None = None,
    home: str | Path | Home | None = None,
) -> int:
    """Run the controller of a stack until a signal (or the watchdog); its exit status.

    On start it republishes what it recorded but never saw confirmed, and continues every
    unfinished run of the stack from the metadata store.
    """
    services = await Services.open(home)
    controller: Controller | None = None
    broker: RabbitMQBroker | None = None
    watchdog: asyncio.Task[int] | None = None
    signals = Signals()
    try:
        spec = await controller_stack(services, stack, stack_file, url)
        config = rabbitmq_config(spec)
        broker = RabbitMQBroker.of_stack(spec.name, config)
        signals.install()
        if not await broker.start_patiently(signals.stop):
            return EXIT_OK  # stopped while waiting for the broker
        store = make_artifact_store(spec)
        controller = Controller(
            services.db,
            broker,
            spec,
            owner=None,
            code_store=store,
            artifacts=store,
            lease_s=config.lease_s,
            max_lost=config.max_deliveries,
        )
        await controller.start()
        settle_after_start()
        watched, driving = broker, controller
        # A controller whose loop ended hears nothing either: it counts as deaf.
        watchdog = watchdog_of(
            broker,
            config,
            lambda: sum(c.active for c in watched.consumers) if driving.alive else 0,
        )
        code = await wait_for_stop(signals, watchdog)
        log.info("controller stopping", stack=spec.name)
        return EXIT_OK if code is None else code
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if controller is not None:
            await controller.stop()
        if broker is not None:
            await broker.stop()
        await services.close()
        signals.uninstall()
        if controller is not None:
            # As a worker says it: a supervisor's log shows the stop went through.
            log.info("controller stopped", stack=spec.name)
