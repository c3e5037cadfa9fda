"""How the controller's events reach the broker while it goes on with the next batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from conveyor.contracts import Event, RunCancelRequested, RunFinished, RunStatus
from conveyor.service.event_publisher import MAX_PUBLISHING, EventPublisher


class Broker:
    """What the publisher needs of a broker: a publish that waits for ``confirm`` and may
    fail; it notes what it published."""

    def __init__(self) -> None:
        self.published: list[list[str]] = []
        self.confirm = asyncio.Event()
        self.confirm.set()
        self.fail_next = False

    async def publish(self, events: Sequence[Event]) -> None:
        await self.confirm.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the broker went away")
        self.published.append([e.event_id for e in events])


def finished(run: str) -> RunFinished:
    return RunFinished(run_id=run, status=RunStatus.COMPLETED)


def kept(event: Event) -> bool:
    return isinstance(event, RunFinished)


def publisher_on(broker: Broker) -> EventPublisher:
    return EventPublisher(broker, kept)  # type: ignore[arg-type]


async def test_confirmed_events_the_outbox_keeps_are_noted_once() -> None:
    broker = Broker()
    publisher = publisher_on(broker)
    done, cancel = finished("r1"), RunCancelRequested(run_id="r1")
    publisher.committed.extend([done, cancel])
    await publisher.send_committed()
    assert publisher.committed == [] and publisher.in_flight
    await publisher.settle(wait=True)
    assert broker.published == [[done.event_id, cancel.event_id]]
    assert publisher.take_confirmed() == [done.event_id]  # only what the outbox keeps
    assert publisher.take_confirmed() == []
    assert not publisher.in_flight


async def test_a_failed_publish_puts_its_events_back_first_and_raises() -> None:
    broker = Broker()
    publisher = publisher_on(broker)
    first, later = finished("r1"), finished("r2")
    broker.fail_next = True
    publisher.committed.append(first)
    await publisher.send_committed()
    await asyncio.sleep(0)  # the publish task runs and fails
    publisher.committed.append(later)  # recorded by the next batch meanwhile
    with pytest.raises(ConnectionError):
        await publisher.settle(wait=False)
    assert publisher.committed == [first, later]
    assert publisher.take_confirmed() == []
    await publisher.publish_committed()
    assert broker.published == [[first.event_id, later.event_id]]
    assert publisher.take_confirmed() == [first.event_id, later.event_id]


async def test_past_the_publishes_in_flight_a_batch_waits_for_the_oldest() -> None:
    broker = Broker()
    broker.confirm.clear()
    publisher = publisher_on(broker)
    for n in range(MAX_PUBLISHING):
        publisher.committed.append(finished(f"r{n}"))
        await publisher.send_committed()  # none waits: the broker confirms nothing yet
    publisher.committed.append(finished("one more"))
    waiting = asyncio.create_task(publisher.send_committed())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    broker.confirm.set()
    await waiting
    await publisher.settle(wait=True)
    assert len(broker.published) == MAX_PUBLISHING + 1
    assert len(publisher.take_confirmed()) == MAX_PUBLISHING + 1
