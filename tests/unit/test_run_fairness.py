"""The in-process broker hands out the steps of the run submitted first before those of
later runs, FIFO within a run; other queues stay FIFO."""

from __future__ import annotations

import asyncio

from conveyor.contracts import (
    Delivery,
    RunFinished,
    RunRequested,
    RunStatus,
    StepReady,
    StepSpec,
    StepStarted,
    Topology,
    WorkerFacts,
)
from conveyor.workers.broker_inprocess import UNRANKED, InProcessBroker, rank_of

SPEC = StepSpec(name="s", ref="m:s")


def ready(run_id: str, step: str = "s") -> StepReady:
    return StepReady(run_id=run_id, step=SPEC.model_copy(update={"name": step}), attempt=1)


def test_a_step_ranks_by_its_runs_submit_order_and_other_events_do_not() -> None:
    submitted = {"early": 0, "late": 5}
    assert rank_of(ready("early"), submitted) < rank_of(ready("late"), submitted)
    assert rank_of(ready("unknown"), submitted) == UNRANKED
    started = StepStarted(run_id="late", step="s", attempt=1, by=WorkerFacts(worker="w", pid=1))
    assert rank_of(started, submitted) == 0


async def _taken(broker: InProcessBroker, queue: str, count: int) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        assert isinstance(delivery.event, StepReady)
        got.append((delivery.event.run_id, delivery.event.step.name))
        await delivery.ack()
        if len(got) == count:
            done.set()

    subscription = await broker.consume(queue, handler, prefetch=1)
    await asyncio.wait_for(done.wait(), 5)
    await subscription.cancel()
    return got


async def test_steps_of_earlier_runs_come_first_and_fifo_within_a_run() -> None:
    broker = InProcessBroker(Topology(stack="s"))
    await broker.publish(
        [RunRequested(run_id=r, pipeline="m:p") for r in ("first", "second", "third")]
    )
    # Published interleaved, as a controller dispatches runs that advance together.
    await broker.publish(
        [
            ready("third", "a"),
            ready("second", "a"),
            ready("first", "a"),
            ready("third", "b"),
            ready("first", "b"),
            ready("unrequested", "a"),
            ready("second", "b"),
        ]
    )
    queue = broker.topology.step_queue("default")
    assert await _taken(broker, queue, 7) == [
        ("first", "a"),
        ("first", "b"),
        ("second", "a"),
        ("second", "b"),
        ("third", "a"),
        ("third", "b"),
        ("unrequested", "a"),
    ]
    await broker.stop()


async def test_a_requeued_step_keeps_its_place() -> None:
    broker = InProcessBroker(Topology(stack="s"))
    await broker.publish([RunRequested(run_id=r, pipeline="m:p") for r in ("one", "two")])
    await broker.publish([ready("one", "a"), ready("two", "a")])
    queue = broker.topology.step_queue("default")
    handed: list[Delivery] = []

    async def hold(delivery: Delivery) -> None:
        handed.append(delivery)

    subscription = await broker.consume(queue, hold, prefetch=1)
    await asyncio.sleep(0.05)
    await subscription.cancel()  # "one"/"a" goes back, ahead of "two"
    assert [d.event.run_id for d in handed] == ["one"]
    await broker.publish([RunFinished(run_id="one", status=RunStatus.COMPLETED)])
    await broker.publish([RunRequested(run_id="three", pipeline="m:p"), ready("three", "a")])
    assert await _taken(broker, queue, 3) == [("one", "a"), ("two", "a"), ("three", "a")]
    await broker.stop()
