"""The in-process broker of the ``local`` orchestrator flavor.

A real broker with the semantics of the RabbitMQ one, inside one asyncio process: named
queues, prefetch, explicit settlement, requeue of what a cancelled consumer left unsettled,
a dead-letter queue with reasons, and per-run status fan-out to followers.

One difference: a step queue hands out the StepReady of the run submitted first before
those of later runs (FIFO within a run), so that of many runs submitted together the first
finish first instead of all at the end (RabbitMQ's queues stay FIFO: docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.contracts import (
    DEFAULT_POOL,
    DeliveryHandler,
    Event,
    Reachability,
    RunFinished,
    RunRequested,
    StatusHandler,
    StepReady,
    Topology,
    UnreadableHandler,
    UnreadableStatusHandler,
    is_control_event,
    is_status_event,
)
from conveyor.workers.loggers import get_logger
from conveyor.workers.status_pump import StatusPump

log = get_logger("conveyor.broker.inprocess")


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be handled, and why."""

    queue: str
    event: Event
    reason: str


UNRANKED = sys.maxsize
"""The rank of a StepReady whose run this broker did not see requested: after the rest."""


class _Message:
    __slots__ = ("event", "lost", "rank", "seq")

    def __init__(self, event: Event, rank: int, seq: int) -> None:
        self.event = event
        self.lost = 0  # deliveries that ended unsettled, their consumer gone
        self.rank = rank
        self.seq = seq
        """Publish order; a requeued message keeps its place, as on RabbitMQ."""


def rank_of(event: Event, submitted: dict[str, int]) -> int:
    """Where ``event`` queues: a StepReady by its run's submit order (``submitted``: run id
    to order), the rest (FIFO) before it; ties go by publish order."""
    if isinstance(event, StepReady):
        return submitted.get(event.run_id, UNRANKED)
    return 0


Entry = tuple[int, int, _Message]
"""How a queue holds a message: (rank, publish order, message); lowest first."""


def entry(message: _Message) -> Entry:
    return (message.rank, message.seq, message)


class _Delivery:
    __slots__ = ("_consumer", "_message", "_settled")

    def __init__(self, consumer: _Consumer, message: _Message) -> None:
        self._consumer = consumer
        self._message = message
        self._settled = False

    @property
    def event(self) -> Event:
        return self._message.event

    @property
    def deliveries(self) -> int:
        return self._message.lost + 1

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._consumer.unsettled.discard(self)
        self._consumer.window.release()
        return True

    async def ack(self) -> None:
        self._settle()

    async def reject(self, reason: str) -> None:
        if self._settle():
            self._consumer.broker.dead_letter(self._consumer.queue, self.event, reason)

    async def requeue(self) -> None:
        if self._settle():
            self._consumer.broker.queue(self._consumer.queue).put_nowait(entry(self._message))


class _Consumer:
    def __init__(
        self, broker: InProcessBroker, queue: str, handler: DeliveryHandler, prefetch: int
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.hands_over = not inspect.iscoroutinefunction(handler)
        self.window = asyncio.Semaphore(prefetch)
        self.unsettled: set[_Delivery] = set()
        # Handler tasks are kept referenced here until they finish, or asyncio may drop them.
        self.tasks: set[asyncio.Task[None]] = set()
        self.pump: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.pump is not None and not self.pump.done()

    async def run(self) -> None:
        source = self.broker.queue(self.queue)
        while True:
            await self.window.acquire()
            _, _, message = await source.get()
            delivery = _Delivery(self, message)
            self.unsettled.add(delivery)
            if self.hands_over:
                await self._handle(delivery)
                continue
            task = asyncio.create_task(self._handle(delivery))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery: _Delivery) -> None:
        try:
            pending = self.handler(delivery)
            if pending is not None:
                await pending
        except Exception as exc:
            log.exception("handler failed", queue=self.queue, event_id=delivery.event.event_id)
            await delivery.reject(f"handler raised {type(exc).__name__}: {exc}")

    async def pause(self) -> None:
        """Take no more messages; the deliveries in hand can still be settled."""
        if self.pump is not None:
            self.pump.cancel()
            await asyncio.gather(self.pump, return_exceptions=True)

    async def cancel(self) -> None:
        await self.pause()
        for delivery in list(self.unsettled):
            # As when a RabbitMQ channel closes: delivered again, counted as lost; a
            # requeue by the handler itself hands it back without counting.
            delivery._message.lost += 1
            await delivery.requeue()
        self.broker.consumers.discard(self)


class _Follower:
    """A follower of one run's status events, or (``run_id`` CONTROL) a control listener."""

    def __init__(self, broker: InProcessBroker, run_id: str, handler: StatusHandler) -> None:
        self.broker = broker
        self.pump = StatusPump(run_id, handler)

    @property
    def active(self) -> bool:
        return self.pump.active

    async def cancel(self) -> None:
        await self.pump.stop()
        self.broker.followers[self.pump.run_id].discard(self)


CONTROL = ""
"""The followers' key of control listeners: the route of control events (no run id is
empty)."""


class InProcessBroker:
    """An asyncio broker living in the current process (the embedded default stack)."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._queues: dict[str, asyncio.PriorityQueue[Entry]] = {}
        self._published = itertools.count()
        self._submitted: dict[str, int] = {}
        """Runs requested and not finished, by the order of their requests."""
        self.consumers: set[_Consumer] = set()
        self.followers: defaultdict[str, set[_Follower]] = defaultdict(set)
        self.dead_letters: list[DeadLetter] = []

    @property
    def topology(self) -> Topology:
        return self._topology

    def queue(self, name: str) -> asyncio.PriorityQueue[Entry]:
        """The named queue, created on first use (declaring is idempotent)."""
        found = self._queues.get(name)
        if found is None:
            found = self._queues[name] = asyncio.PriorityQueue()
        return found

    def depth(self, name: str) -> int:
        """Messages waiting in ``name`` (not counting those delivered but unsettled)."""
        return self.queue(name).qsize()

    async def reachability(self) -> Reachability:
        return Reachability(True, "in-process broker")

    async def queue_depths(self) -> dict[str, int]:
        topology = self.topology
        names = [topology.runs_queue, topology.events_queue, topology.step_queue(DEFAULT_POOL)]
        depths = {name: self.depth(name) for name in names}
        depths[topology.dead_letter_queue] = len(self.dead_letters)
        return depths

    def dead_letter(self, queue: str, event: Event, reason: str) -> None:
        log.warning("dead-lettered", queue=queue, event_id=event.event_id, reason=reason)
        self.dead_letters.append(DeadLetter(queue, event, reason))

    async def start(self) -> None:
        """Nothing to connect to."""

    async def pause(self) -> None:
        """Stop every consumer from taking more messages; idempotent."""
        for consumer in list(self.consumers):
            await consumer.pause()

    async def stop(self) -> None:
        """Cancel every consumer and follower; idempotent."""
        for consumer in list(self.consumers):
            await consumer.cancel()
        for followers in list(self.followers.values()):
            for follower in list(followers):
                await follower.cancel()

    async def publish(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, RunRequested):
                self._submitted.setdefault(event.run_id, next(self._published))
            elif isinstance(event, RunFinished):
                self._submitted.pop(event.run_id, None)
            route = self._topology.route(event)
            if is_status_event(event) or is_control_event(event):
                # A run id for status events; CONTROL for control events.
                for follower in self.followers.get(route, ()):
                    follower.pump.inbox.put_nowait(event)
            else:
                rank = rank_of(event, self._submitted)
                message = _Message(event, rank, next(self._published))
                self.queue(route).put_nowait(entry(message))

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        unreadable: UnreadableHandler | None = None,
    ) -> _Consumer:
        # ``unreadable`` is never called: events cross this broker as objects, never as
        # bytes, from this process's own release, so none is unreadable.
        consumer = _Consumer(self, queue, handler, prefetch)
        consumer.pump = asyncio.create_task(consumer.run(), name=f"consume:{queue}")
        self.consumers.add(consumer)
        return consumer

    async def follow(
        self,
        run_id: str,
        handler: StatusHandler,
        *,
        unreadable: UnreadableStatusHandler | None = None,
    ) -> _Follower:
        # ``unreadable`` is never called, as in ``consume``.
        follower = _Follower(self, run_id, handler)
        follower.pump.start()
        self.followers[run_id].add(follower)
        return follower

    async def listen(
        self, handler: StatusHandler, *, unreadable: UnreadableStatusHandler | None = None
    ) -> _Follower:
        return await self.follow(CONTROL, handler, unreadable=unreadable)
