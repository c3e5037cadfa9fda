"""Looking into a broker for health checks and metrics, whichever adapter it is.

The ``Broker`` protocol is what the controller and workers need; a health check and a queue
gauge need more, and what they need differs per adapter, so it is gathered here.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.contracts import DEFAULT_POOL, Broker
from conveyor.workers.broker_inprocess import InProcessBroker
from conveyor.workers.broker_rabbitmq import RabbitMQBroker


@dataclass(frozen=True)
class Reachability:
    ok: bool
    detail: str


async def reachable(broker: Broker) -> Reachability:
    """Whether the broker answers now (for RabbitMQ: a channel opens and closes)."""
    if isinstance(broker, RabbitMQBroker):
        down_for = broker.unreachable_for
        if down_for is not None:
            return Reachability(
                False,
                f"RabbitMQ at {broker.safe_url} unreachable for {down_for:.0f}s; reconnecting",
            )
        # The moments before the broker adapter notices a loss look the same to a user.
        lost = f"RabbitMQ at {broker.safe_url} unreachable; reconnecting"
        try:
            connection = broker.connection
            if connection.is_closed:
                return Reachability(False, lost)
            channel = await connection.channel()
            await channel.close()
        except Exception as exc:
            # Not the exception's text: aio-pika's names the connection, URL and all.
            return Reachability(False, f"{lost} ({type(exc).__name__})")
        return Reachability(True, "RabbitMQ answers")
    if isinstance(broker, InProcessBroker):
        return Reachability(True, "in-process broker")
    return Reachability(True, f"{type(broker).__name__} (no probe)")


async def queue_depths(broker: Broker) -> dict[str, int]:
    """Messages ready in each queue of the broker's stack (unacked ones not counted)."""
    topology = broker.topology
    if isinstance(broker, RabbitMQBroker):
        names = sorted(broker.declared.queues) or [topology.runs_queue, topology.events_queue]
        # A passive declare of a queue that vanished closes its channel: use a throwaway one.
        channel = await broker.connection.channel()
        try:
            depths = {}
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                result = queue.declaration_result
                depths[name] = int(result.message_count or 0)
            return depths
        finally:
            if not channel.is_closed:
                await channel.close()
    if isinstance(broker, InProcessBroker):
        names = [topology.runs_queue, topology.events_queue, topology.step_queue(DEFAULT_POOL)]
        depths = {name: broker.depth(name) for name in names}
        depths[topology.dead_letter_queue] = len(broker.dead_letters)
        return depths
    return {}
