"""Whether each component of a stack can be reached now: one line each for ``stack describe``;
and the queues of a rabbitmq stack, for its dashboard page and for the changes that would
strand its consumers (``service.consumers``).

A probe never raises and never shows a secret: a component that cannot be reached gets a
line saying where it was looked for and why it failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from conveyor.contracts import (
    DEFAULT_POOL,
    ComponentSpec,
    ComponentType,
    ConveyorError,
    StackSpec,
    Topology,
)
from conveyor.workers.flavors import get_flavor, make_artifact_store, orchestrator_config
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig

PROBE_TIMEOUT_S = 5.0
"""How long a probe, a queue report or a queue removal waits for a broker (or a store) in
all: connecting, then a round trip per queue. A port nothing listens on is refused at once;
only a host that drops the packets, or a hung broker, is waited for this long. Not shorter:
a delete or a move of a stack goes ahead without its consumers check when the broker does
not answer in time, so a live but distant broker, with a hundred queues to ask about, must
have the time to say that something still consumes them."""


@dataclass(frozen=True)
class ComponentProbe:
    """The outcome of probing one component."""

    ok: bool
    detail: str


def _where(url: str) -> str:
    """A broker's host, port and virtual host: its URL without credentials, for messages."""
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
    except Exception as exc:
        return ComponentProbe(False, broker_problem(url, exc, timeout))
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


@dataclass(frozen=True)
class QueueStat:
    """A queue of a stack's broker: messages ready and consumers (``None``: not declared)."""

    name: str
    messages: int | None
    consumers: int | None


@dataclass(frozen=True)
class QueueReport:
    """The queues of a rabbitmq stack, or the reason they could not be read."""

    where: str
    queues: list[QueueStat]
    problem: str | None = None


def queue_names(topology: Topology, pools: list[str]) -> list[str]:
    """The queues a stack's broker declares: runs, events, a step queue per pool, dead letters."""
    step_pools = dict.fromkeys([DEFAULT_POOL, *pools])
    return [
        topology.runs_queue,
        topology.events_queue,
        *(topology.step_queue(pool) for pool in step_pools),
        topology.dead_letter_queue,
    ]


async def _read_queues(url: str, names: list[str]) -> list[QueueStat]:
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        stats = []
        channel = await connection.channel()
        for name in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                # A passive declare of a missing queue closes the channel: open another.
                stats.append(QueueStat(name, None, None))
                channel = await connection.channel()
                continue
            result = queue.declaration_result
            stats.append(QueueStat(name, result.message_count, result.consumer_count))
        return stats
    finally:
        await connection.close()


def _without_secret(text: str, url: str) -> str:
    """``text`` (an error naming ``url``) with the URL's password out of it."""
    password = urlsplit(url).password
    text = text.replace(url, _where(url))
    return text.replace(password, "***") if password else text


def broker_problem(url: str, exc: BaseException, timeout: float) -> str:
    """Why the broker at ``url`` could not be asked (``exc``, after ``timeout`` seconds at
    most), as a line for a person, without the URL's password."""
    if isinstance(exc, TimeoutError):
        return f"RabbitMQ at {_where(url)} did not answer in {timeout:g}s"
    detail = _without_secret(str(exc) or type(exc).__name__, url)
    return f"cannot reach RabbitMQ at {_where(url)}: {detail}"


def rabbitmq_queues(
    stack: StackSpec, pools: Iterable[str] = ()
) -> tuple[str, Topology, list[str]] | None:
    """The broker URL of a rabbitmq ``stack``, its topology and the queues it declares (with
    the step queues of ``pools`` besides those of its configuration); ``None`` for another
    orchestrator. Raises ConveyorError for a configuration that does not validate."""
    config = orchestrator_config(stack)
    if not isinstance(config, RabbitMQOrchestratorConfig):
        return None
    topology = Topology(stack=stack.name, prefix=config.prefix)
    return config.url.get_secret_value(), topology, queue_names(topology, [*config.pools, *pools])


def broker_address(orchestrator: ComponentSpec) -> str | None:
    """Where a rabbitmq ``orchestrator``'s broker is (host, port, virtual host; never its
    credentials), for a person; ``None`` for another flavor or a configuration that does not
    validate."""
    try:
        config = get_flavor(orchestrator.type, orchestrator.flavor).validate(orchestrator.config)
    except ConveyorError:
        return None
    if not isinstance(config, RabbitMQOrchestratorConfig):
        return None
    return _where(config.url.get_secret_value())


def queues_place(stack: StackSpec) -> tuple[str, str] | None:
    """Where a rabbitmq ``stack``'s queues are: its broker's URL (with the virtual host) and
    the prefix of their names; ``None`` for another orchestrator or a configuration that
    does not validate."""
    try:
        config = orchestrator_config(stack)
    except ConveyorError:
        return None
    if not isinstance(config, RabbitMQOrchestratorConfig):
        return None
    return config.url.get_secret_value(), config.prefix


async def queue_report(
    stack: StackSpec, timeout: float = PROBE_TIMEOUT_S, pools: Iterable[str] = ()
) -> QueueReport | None:
    """Depth and consumers of each queue of a rabbitmq ``stack`` (``None`` for another
    orchestrator), with the step queues of ``pools`` besides those of its configuration;
    never raises: a broker that does not answer is a report with a problem."""
    try:
        found = rabbitmq_queues(stack, pools)
    except ConveyorError as exc:
        return QueueReport("", [], f"the orchestrator's configuration is invalid: {exc}")
    if found is None:
        return None
    url, _, names = found
    try:
        queues = await asyncio.wait_for(_read_queues(url, names), timeout)
    except Exception as exc:
        return QueueReport(_where(url), [], broker_problem(url, exc, timeout))
    return QueueReport(_where(url), queues)
