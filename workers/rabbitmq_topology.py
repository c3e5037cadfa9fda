"""How a stack's topology looks on RabbitMQ, and declaring it (idempotently) on a channel.

Names come from :class:`conveyor.contracts.Topology`; this module only adds RabbitMQ's
shape: durable exchanges and queues, every work queue dead-lettering into the stack's
dead-letter exchange, status events on a topic exchange keyed by run id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from conveyor.contracts import DEFAULT_POOL, Topology

REASON_HEADER = "x-conveyor-reason"
"""Why a message was dead-lettered (set by Conveyor; RabbitMQ's own is in ``x-death``)."""
QUEUE_HEADER = "x-conveyor-queue"
"""The queue a dead-lettered message was consumed from."""
VERSION_HEADER = "x-conveyor-version"
"""The Conveyor release of the process that published the message (outside the event, so
that releases before it read the event as ever): named when a reader cannot read it."""
DELIVERIES_HEADER = "x-conveyor-deliveries"
"""Deliveries of a step message that ended unsettled (classic queues count none of their own)."""


def queue_arguments(topology: Topology) -> dict[str, Any]:
    """Arguments of every work queue. Declarers must agree on them, or RabbitMQ refuses."""
    return {"x-dead-letter-exchange": topology.dead_letter_exchange}


def work_queues(topology: Topology, pools: Iterable[str] = ()) -> list[str]:
    """The queues a stack always has: runs, completion events, and the step queue per pool."""
    names = [topology.runs_queue, topology.events_queue]
    for pool in [DEFAULT_POOL, *pools]:
        queue = topology.step_queue(pool)
        if queue not in names:
            names.append(queue)
    return names


@dataclass
class Declared:
    """The declared exchanges and queues of one channel.

    aio-pika restores after a reconnect only what is still referenced (its channel keeps
    weak references), so these references are what keeps the topology alive.
    """

    work: AbstractExchange
    status: AbstractExchange
    control: AbstractExchange
    dead: AbstractExchange
    queues: dict[str, AbstractQueue] = field(default_factory=dict)


async def declare_exchanges(channel: AbstractChannel, topology: Topology) -> Declared:
    """Declare the stack's four exchanges and its dead-letter queue."""
    work = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    status = await channel.declare_exchange(
        topology.status_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    control = await channel.declare_exchange(
        topology.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    declared = Declared(work=work, status=status, control=control, dead=dead)
    dead_queue = await channel.declare_queue(topology.dead_letter_queue, durable=True)
    await dead_queue.bind(dead, routing_key="")
    declared.queues[topology.dead_letter_queue] = dead_queue
    return declared


async def declare_work_queue(
    channel: AbstractChannel, topology: Topology, declared: Declared, name: str
) -> AbstractQueue:
    """Declare a durable work queue bound to the stack's exchange under its own name."""
    found = declared.queues.get(name)
    if found is not None:
        return found
    queue = await channel.declare_queue(name, durable=True, arguments=queue_arguments(topology))
    await queue.bind(declared.work, routing_key=name)
    declared.queues[name] = queue
    return queue


async def declare_topology(
    channel: AbstractChannel, topology: Topology, pools: Iterable[str] = ()
) -> Declared:
    """Declare everything a stack needs; safe to run from every process, any number of times."""
    declared = await declare_exchanges(channel, topology)
    for name in work_queues(topology, pools):
        await declare_work_queue(channel, topology, declared, name)
    return declared


def definitions(topology: Topology, pools: Iterable[str] = (), vhost: str = "/") -> dict[str, Any]:
    """The topology as a RabbitMQ definitions document (``rabbitmqctl import_definitions``)."""

    def exchange(name: str, type_: str) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "type": type_,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }

    def queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": arguments,
        }

    def binding(source: str, queue_name: str, key: str) -> dict[str, Any]:
        return {
            "source": source,
            "vhost": vhost,
            "destination": queue_name,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

    names = work_queues(topology, pools)
    return {
        "exchanges": [
            exchange(topology.exchange, "direct"),
            exchange(topology.status_exchange, "topic"),
            exchange(topology.control_exchange, "fanout"),
            exchange(topology.dead_letter_exchange, "fanout"),
        ],
        "queues": [
            queue(topology.dead_letter_queue, {}),
            *(queue(name, queue_arguments(topology)) for name in names),
        ],
        "bindings": [
            binding(topology.dead_letter_exchange, topology.dead_letter_queue, ""),
            *(binding(topology.exchange, name, name) for name in names),
        ],
    }
