"""Publishing what the controller recorded, without waiting for the broker's confirms.

A committed batch's events are handed to the broker in a task of their own, and the next
batch is processed while the broker confirms them (at most ``MAX_PUBLISHING`` batches at
once). The ids of confirmed events that the outbox keeps are noted, for the controller to
mark them sent in a later transaction. Events whose publish failed go back to be published
again; their error reaches the controller, which backs off.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from conveyor.contracts import Broker, ConveyorError, Event

MAX_PUBLISHING = 8
"""Committed batches whose events may await the broker's confirms at once: the next batch
is processed meanwhile, and one more than this waits for the oldest."""

Publishing = tuple[asyncio.Task[None], list[Event], list[str]]
"""A publish in flight: its task, its events (published again if it fails) and the outbox
ids among them."""


class EventPublisher:
    """The controller's events on their way to the broker; ``kept`` says which of them the
    outbox holds until they are confirmed."""

    def __init__(self, broker: Broker, kept: Callable[[Event], bool]) -> None:
        self._broker = broker
        self._kept = kept
        self.committed: list[Event] = []
        """Recorded and not handed to the broker yet (or handed, and failed)."""
        self._confirmed: list[str] = []
        self._publishing: deque[Publishing] = deque()

    @property
    def in_flight(self) -> bool:
        """Whether publishes await confirms, or confirmed ids await being marked sent."""
        return bool(self._publishing or self._confirmed)

    def take_confirmed(self) -> list[str]:
        """The outbox ids confirmed since the last call, to mark sent."""
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    async def publish_committed(self) -> None:
        """Publish what a committed batch produced again, after publishing it failed."""
        if self.committed:
            await self._broker.publish(self.committed)
            self._confirmed.extend(e.event_id for e in self.committed if self._kept(e))
            self.committed = []

    async def send_committed(self) -> None:
        """Hand what a committed batch produced to the broker, without waiting for its
        confirms: the batch's deliveries are acked (their effect is in the outbox), and
        the next batch is processed while the broker confirms."""
        if not self.committed:
            return
        if len(self._publishing) >= MAX_PUBLISHING:
            await self.settle(wait=False, oldest=True)
        events, self.committed = self.committed, []
        task = asyncio.create_task(self._broker.publish(events), name="controller publish")
        self._publishing.append((task, events, [e.event_id for e in events if self._kept(e)]))

    async def settle(self, *, wait: bool, oldest: bool = False) -> None:
        """Note the confirmed publishes (all of them with ``wait``, the oldest at least
        with ``oldest``, else those done). The events of a failed one go back to
        ``committed``, to be published again, and its error is raised."""
        if wait and self._publishing:
            await asyncio.wait([task for task, _, _ in self._publishing])
        elif oldest:
            await asyncio.wait([self._publishing[0][0]])
        failed: list[Event] = []
        error: BaseException | None = None
        kept: deque[Publishing] = deque()
        for task, events, durable in self._publishing:
            if not task.done():
                kept.append((task, events, durable))
            elif task.cancelled() or task.exception() is not None:
                # aiormq cancels the confirms pending on a connection it gave up: a publish
                # that ends cancelled while nobody stops the controller failed like another.
                failed.extend(events)
                if error is None:
                    error = (
                        ConveyorError("publishing was cancelled")
                        if task.cancelled()
                        else task.exception()
                    )
            else:
                self._confirmed.extend(durable)
        self._publishing = kept
        if error is not None:
            self.committed[:0] = failed
            raise error
