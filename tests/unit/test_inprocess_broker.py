"""The in-process broker's graceful stop: pause stops taking messages, not settling them."""

from __future__ import annotations

import asyncio

from conveyor.contracts import Delivery, RunCancelRequested, Topology
from conveyor.workers.broker_inprocess import InProcessBroker


async def test_pause_stops_taking_messages_while_those_in_hand_can_be_acked() -> None:
    broker = InProcessBroker(Topology(stack="s"))
    queue = broker.topology.runs_queue
    held: list[Delivery] = []
    arrived = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        held.append(delivery)
        arrived.set()
        await asyncio.Event().wait()  # a long step: holds its delivery until cancelled

    subscription = await broker.consume(queue, handler, prefetch=4)
    await broker.publish([RunCancelRequested(run_id="a")])
    await asyncio.wait_for(arrived.wait(), 5)

    await broker.pause()
    await broker.pause()  # idempotent
    assert not subscription.active
    await broker.publish([RunCancelRequested(run_id="b")])
    await asyncio.sleep(0.05)
    assert [d.event.run_id for d in held] == ["a"]  # "b" waits in the queue
    assert broker.depth(queue) == 1

    await held[0].ack()
    await broker.stop()
    assert broker.depth(queue) == 1 and broker.dead_letters == []
