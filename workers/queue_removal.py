"""Removing a rabbitmq stack's queues and exchanges from its broker once nothing will use them
again: after the stack is renamed or deleted, or moved to other queues.

Only what is empty and unused goes: a queue that holds messages (dead letters a person has
not read yet, say) or has a consumer stays, and so does an exchange with a binding left.
Like a probe, it never raises and never shows a secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from conveyor.contracts import ConveyorError, StackSpec
from conveyor.workers.stack_probes import PROBE_TIMEOUT_S, broker_problem, rabbitmq_queues


@dataclass(frozen=True)
class Removal:
    """What went from the broker, and what stayed and why (``problem``: it was not reached)."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    problem: str | None = None


async def _remove(url: str, queues: list[str], exchanges: list[str]) -> Removal:
    import aio_pika  # only a rabbitmq stack pays for importing the client
    from aio_pika.exceptions import ChannelClosed

    removal = Removal()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for name in queues:
            try:
                await channel.queue_delete(name, if_unused=True, if_empty=True)
                removal.removed.append(name)
            except ChannelClosed:
                # It holds messages or has consumers (406), which closes the channel.
                channel = await connection.channel()
                queue = await channel.declare_queue(name, passive=True)
                held = queue.declaration_result
                removal.kept.append(
                    f"{name} ({held.message_count} message(s), {held.consumer_count} consumer(s))"
                )
        for name in exchanges:
            try:
                await channel.exchange_delete(name, if_unused=True)
                removal.removed.append(name)
            except ChannelClosed:
                channel = await connection.channel()
                removal.kept.append(f"{name} (a queue is still bound to it)")
    finally:
        await connection.close()
    return removal


async def remove_queues(
    stack: StackSpec, pools: Iterable[str] = (), timeout: float = PROBE_TIMEOUT_S
) -> Removal | None:
    """Delete the empty, unused queues and exchanges of a rabbitmq ``stack`` (with the step
    queues of ``pools`` besides its configuration's); ``None`` for another orchestrator."""
    try:
        found = rabbitmq_queues(stack, pools)
    except ConveyorError as exc:
        return Removal(problem=f"the orchestrator's configuration is invalid: {exc}")
    if found is None:
        return None
    url, topology, queues = found
    try:
        return await asyncio.wait_for(_remove(url, queues, topology.exchanges), timeout)
    except Exception as exc:
        return Removal(problem=broker_problem(url, exc, timeout))
