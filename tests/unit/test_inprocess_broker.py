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


async def test_deliveries_count_those_lost_with_their_consumer_not_those_handed_back() -> None:
    broker = InProcessBroker(Topology(stack="s"))
    queue = broker.topology.runs_queue
    seen: list[int] = []
    got = asyncio.Event()

    async def hand_back_once(delivery: Delivery) -> None:
        seen.append(delivery.deliveries)
        if len(seen) == 1:
            await delivery.requeue()  # handed back on purpose
        else:
            await delivery.ack()
        got.set()

    first = await broker.consume(queue, hand_back_once, prefetch=1)
    await broker.publish([RunCancelRequested(run_id="a")])
    while len(seen) < 2:
        got.clear()
        await asyncio.wait_for(got.wait(), 5)
    assert seen == [1, 1]
    await first.cancel()

    async def hold(delivery: Delivery) -> None:
        seen.append(delivery.deliveries)
        got.set()
        await asyncio.Event().wait()

    await broker.publish([RunCancelRequested(run_id="b")])
    for _ in range(2):
        got.clear()
        holder = await broker.consume(queue, hold, prefetch=1)
        await asyncio.wait_for(got.wait(), 5)
        await holder.cancel()  # its consumer gone with the delivery unsettled
    assert seen[2:] == [1, 2]
    await broker.stop()
