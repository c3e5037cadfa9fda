"""Whether each component of a stack can be reached now: one line each for ``stack describe``.

A probe never raises and never shows a secret: a component that cannot be reached gets a
line saying where it was looked for and why it failed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from conveyor.contracts import ComponentType, ConveyorError, StackSpec
from conveyor.workers.flavors import get_flavor, make_artifact_store, orchestrator_config
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig

PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ComponentProbe:
    """The outcome of probing one component."""

    ok: bool
    detail: str


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


async def _orchestrator(stack: StackSpec, timeout: float) -> ComponentProbe:
    component = stack.component(ComponentType.ORCHESTRATOR)
    if get_flavor(component.type, component.flavor).embedded:
        return ComponentProbe(True, "embedded: runs inside each client process")
    try:
        config = orchestrator_config(stack)
    except ConveyorError as exc:
        # Stored before a check was added, or edited by hand: say so, beside the rest.
        return ComponentProbe(False, str(exc))
    if not isinstance(config, RabbitMQOrchestratorConfig):
        return ComponentProbe(True, f"{component.flavor}: no probe")
    import aio_pika  # only a rabbitmq stack pays for importing the client

    url = config.url.get_secret_value()
    try:
        connection = await asyncio.wait_for(aio_pika.connect(url), timeout)
        await connection.close()
    except TimeoutError:
        return ComponentProbe(False, f"RabbitMQ at {_where(url)} did not answer in {timeout:g}s")
    except Exception as exc:
        return ComponentProbe(False, f"cannot reach RabbitMQ at {_where(url)}: {exc}")
    return ComponentProbe(True, f"RabbitMQ answers at {_where(url)}")


async def _artifact_store(stack: StackSpec, timeout: float) -> ComponentProbe:
    try:
        store = make_artifact_store(stack)
        await asyncio.wait_for(asyncio.to_thread(store.check), timeout)
    except TimeoutError:
        return ComponentProbe(False, f"no answer in {timeout:g}s")
    except ConveyorError as exc:
        return ComponentProbe(False, str(exc))
    return ComponentProbe(True, f"reachable: {store.location}")


async def probe_stack(
    stack: StackSpec, timeout: float = PROBE_TIMEOUT_S
) -> dict[ComponentType, ComponentProbe]:
    """A probe of each component of ``stack``, run side by side."""
    orchestrator, store = await asyncio.gather(
        _orchestrator(stack, timeout), _artifact_store(stack, timeout)
    )
    return {ComponentType.ORCHESTRATOR: orchestrator, ComponentType.ARTIFACT_STORE: store}
