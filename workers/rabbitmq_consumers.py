"""The consuming side of the ``rabbitmq`` broker: deliveries, consumers and followers.

Each consumer has a channel of its own; each delivery is settled exactly once; the runs a
process follows share one exclusive status queue, a binding per run, and the stack's control
events have an exclusive queue of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from conveyor.contracts import (
    ConflictError,
    DeliveryHandler,
    Event,
    MalformedEvent,
    StatusHandler,
    StepReady,
    Unreadable,
    UnreadableHandler,
    UnreadableStatusHandler,
    parse_event,
    read_identity,
    read_version,
)
from conveyor.contracts.events import Rider
from conveyor.contracts.unreadable import unreadable
from conveyor.workers.loggers import get_logger
from conveyor.workers.rabbitmq_errors import RETRYABLE, TRANSIENT
from conveyor.workers.rabbitmq_topology import DELIVERIES_HEADER, VERSION_HEADER, queue_arguments
from conveyor.workers.status_pump import StatusPump

if TYPE_CHECKING:
    from conveyor.workers.broker_rabbitmq import RabbitMQBroker

log = get_logger("conveyor.broker.rabbitmq")


def _live_consumer_tags(channel: AbstractRobustChannel) -> Mapping[str, object]:
    # aio-pika has no public view of the consumers the broker still delivers to: the
    # underlay channel's table is where a lost or broker-cancelled consumer disappears.
    underlay = getattr(channel, "_channel", None)
    amqp_channel = getattr(underlay, "channel", None)
    if amqp_channel is None or amqp_channel.is_closed:
        return {}
    consumers: Mapping[str, object] = amqp_channel.consumers
    return consumers


def rider_key(run_id: str, rider: Rider | StepReady) -> str:
    return f"{run_id}/{rider.step.name}/{rider.attempt}"


class Holding:
    """Keys (a StepReady's event id; a rider's run, step and attempt) that a StepReady coming
    to a consumer waits on, each until the delivery it was sent from is settled."""

    def __init__(self) -> None:
        self._held: dict[str, asyncio.Event] = {}

    def hold(self, keys: Sequence[str]) -> Callable[[], None]:
        """Hold ``keys`` until the function returned is called."""
        settled = asyncio.Event()
        for key in keys:
            self._held[key] = settled

        def release() -> None:
            settled.set()
            for key in keys:
                if self._held.get(key) is settled:
                    del self._held[key]

        return release

    async def settled(self, *keys: str) -> None:
        for key in keys:
            held = self._held.get(key)
            if held is not None:
                await held.wait()

    def release_all(self) -> None:
        for settled in self._held.values():
            settled.set()
        self._held.clear()


def _nothing() -> None:
    pass


def _riders(event: Event) -> list[str]:
    """The keys of the steps riding on ``event``. Not those riding on its siblings: a
    message with siblings is settled when all of its steps are, and a rider forwarded from
    one of them must not wait for the others to end; were the message delivered again, it
    would be split into one message per step (``workers.message_parts``), each holding its
    own riders here."""
    if not isinstance(event, StepReady):
        return []
    return [rider_key(event.run_id, rider) for rider in event.then]


class RabbitDelivery:
    __slots__ = ("_consumer", "_event", "_let_riders_go", "_message", "_settled")

    def __init__(self, consumer: Consumer, message: AbstractIncomingMessage, event: Event) -> None:
        self._consumer = consumer
        self._message = message
        self._event = event
        self._settled = False
        # Its riders, which its worker may forward before it acks it (RabbitMQBroker.holding).
        riders = _riders(event)
        self._let_riders_go = consumer.broker.holding.hold(riders) if riders else _nothing

    @property
    def event(self) -> Event:
        return self._event

    @property
    def deliveries(self) -> int:
        return lost_deliveries(self._message) + 1

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        if not self._settle():
            return
        try:
            await self._message.ack()
        except TRANSIENT:
            # The channel it came on is gone: the broker delivers it again, and the
            # (run, step, attempt) key makes the second delivery harmless.
            log.warning(
                "ack on a closed channel; the message will be delivered again",
                queue=self._consumer.queue,
                event_id=self._event.event_id,
            )
        finally:
            self._let_riders_go()

    async def reject(self, reason: str) -> None:
        if not self._settle():
            return
        try:
            await self._consumer.broker.dead_letter(self._consumer.queue, self._message, reason)
        finally:
            self._let_riders_go()

    async def requeue(self) -> None:
        if not self._settle():
            return
        try:
            if isinstance(self._event, StepReady):
                # Handed back on purpose, not lost: a requeue would count as a lost delivery.
                await self._consumer.broker.put_back(
                    self._consumer.queue, self._message, lost_deliveries(self._message)
                )
                return
            # A closed channel requeues it anyway.
            with contextlib.suppress(*TRANSIENT):
                await self._message.nack(requeue=True)
        finally:
            self._let_riders_go()


class RabbitUnreadable:
    """A message no event could be read from, whose run can be named; it ends in the
    dead-letter queue with the reason, unless it is requeued."""

    __slots__ = ("_consumer", "_message", "_settled", "_unreadable")

    def __init__(
        self, consumer: Consumer, message: AbstractIncomingMessage, unreadable: Unreadable
    ) -> None:
        self._consumer = consumer
        self._message = message
        self._unreadable = unreadable
        self._settled = False

    @property
    def unreadable(self) -> Unreadable:
        return self._unreadable

    async def reject(self, reason: str | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        why = self._unreadable.reason if reason is None else f"{self._unreadable.reason}; {reason}"
        await self._consumer.broker.dead_letter(self._consumer.queue, self._message, why)

    async def requeue(self) -> None:
        if self._settled:
            return
        self._settled = True
        with contextlib.suppress(*TRANSIENT):  # a closed channel requeues it anyway
            await self._message.nack(requeue=True)


class Consumer:
    """One consumer on its own channel, so that its prefetch and failures stay its own."""

    def __init__(
        self,
        broker: RabbitMQBroker,
        queue: str,
        handler: DeliveryHandler,
        prefetch: int,
        unreadable: UnreadableHandler | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
        self.unreadable = unreadable
        self.hands_over = not inspect.iscoroutinefunction(handler)
        self.prefetch = prefetch
        self.channel: AbstractRobustChannel | None = None
        self.amqp_queue: AbstractQueue | None = None
        self.tag: str | None = None
        self.receiving = False
        # Handler tasks are kept here: aio-pika would throw into its own callback tasks when
        # the channel closes, and a step that finishes anyway can still publish its result.
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> bool:
        if not self.receiving or self.channel is None or self.tag is None:
            return False
        return self.tag in _live_consumer_tags(self.channel)

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self.channel = channel
        await channel.set_qos(prefetch_count=self.prefetch)
        topology = self.broker.topology
        arguments = None if self.queue == topology.dead_letter_queue else queue_arguments(topology)
        self.amqp_queue = await channel.declare_queue(self.queue, durable=True, arguments=arguments)
        # The controller's queues take one consumer: a second controller on the stack would
        # write the same runs from another store; the broker refuses it at start.
        exclusive = self.queue in (topology.events_queue, topology.runs_queue)
        try:
            self.tag = await self.amqp_queue.consume(self._on_message, exclusive=exclusive)
        except aiormq.exceptions.ChannelAccessRefused:
            raise ConflictError(
                f"queue {self.queue!r} already has its consumer: is another controller of "
                f"stack {topology.stack!r} running?"
            ) from None
        self.receiving = True

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = parse_event(message.body)
        except MalformedEvent as exc:
            await self._cannot_read(message, str(exc))
            return
        if message.redelivered and isinstance(event, StepReady):
            # Its last delivery ended unsettled: a worker died or lost the broker while it
            # held it. Classic queues do not count that, so the count travels in a header of
            # a copy; the worker that gets the copy decides whether to run it again.
            release = self.broker.holding.hold([event.event_id])
            try:
                await self.broker.put_back(self.queue, message, lost_deliveries(message) + 1)
            finally:
                release()
            return
        if isinstance(event, StepReady):
            # A copy handed back, or a rider forwarded, that came back to this process
            # before the delivery it was sent from was settled: were it run (a step that
            # kills its worker) before that ack left, that delivery would come again and
            # send it once more, its deliveries counted from the start.
            await self.broker.holding.settled(event.event_id, rider_key(event.run_id, event))
        delivery = RabbitDelivery(self, message, event)
        if self.hands_over:
            try:
                self.handler(delivery)
            except Exception as exc:
                await self._failed(delivery, exc)
            return
        task = asyncio.create_task(self._handle(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _cannot_read(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Dead-letter ``message``; through the ``unreadable`` handler when it has one and
        the message's run can be named, so that the run hears of it."""
        found = None if self.unreadable is None else unreadable_of(message, reason)
        if found is None:
            await self.broker.dead_letter(self.queue, message, reason)
            return
        delivery = RabbitUnreadable(self, message, found)
        task = asyncio.create_task(self._tell(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tell(self, delivery: RabbitUnreadable) -> None:
        assert self.unreadable is not None
        try:
            pending = self.unreadable(delivery)
            if pending is not None:
                await pending
        except RETRYABLE as exc:
            log.warning("broker lost while handling an unreadable message", error=str(exc))
            await delivery.requeue()
        except Exception as exc:
            log.exception("unreadable message handler failed", queue=self.queue, exc_info=exc)
            await delivery.reject(f"its handler raised {type(exc).__name__}: {exc}")

    async def _handle(self, delivery: RabbitDelivery) -> None:
        try:
            pending = self.handler(delivery)
            if pending is not None:
                await pending
        except Exception as exc:
            await self._failed(delivery, exc)

    async def _failed(self, delivery: RabbitDelivery, exc: Exception) -> None:
        event_id = delivery.event.event_id
        if isinstance(exc, RETRYABLE):
            log.warning(
                "broker lost while handling; the message will be delivered again",
                queue=self.queue,
                event_id=event_id,
                error=f"{type(exc).__name__}: {exc}",
            )
            await delivery.requeue()
            return
        log.exception("handler failed", queue=self.queue, event_id=event_id, exc_info=exc)
        await delivery.reject(f"handler raised {type(exc).__name__}: {exc}")

    async def pause(self) -> None:
        """Stop new deliveries; those in hand can still be acked on the open channel."""
        if not self.receiving or self.amqp_queue is None or self.tag is None:
            return
        self.receiving = False
        # A lost channel delivers nothing more either.
        queue, tag = self.amqp_queue, self.tag
        await self.broker.on_the_way_out(lambda: queue.cancel(tag))

    async def cancel(self) -> None:
        await self.pause()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            # Closing the channel is what makes the broker requeue what is unsettled (so
            # does losing the connection).
            await self.broker.on_the_way_out(channel.close)
        self.broker.holding.release_all()  # the broker delivers what they waited for again
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.broker.consumers.discard(self)


class Follower:
    """The control events of the stack, through an exclusive queue of its own bound to the
    control exchange."""

    def __init__(
        self,
        broker: RabbitMQBroker,
        handler: StatusHandler,
        exchange: str,
        unreadable: UnreadableStatusHandler | None = None,
    ) -> None:
        self.broker = broker
        self.exchange = exchange
        self.pump = StatusPump("control", handler, unreadable)
        self.amqp_queue: AbstractQueue | None = None
        self.tag: str | None = None

    @property
    def active(self) -> bool:
        return self.pump.active

    async def start(self, channel: AbstractRobustChannel) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        self.amqp_queue = queue
        await queue.bind(self.exchange, routing_key=self.pump.run_id)
        self.tag = await queue.consume(self._on_message, no_ack=True)
        self.pump.start()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            event = parse_event(message.body)
        except MalformedEvent as exc:
            reason = str(exc)
            found = None if self.pump.unreadable is None else unreadable_of(message, reason)
            if found is not None:
                self.pump.inbox.put_nowait(found)  # in its place, before the copy is kept
            # Every listener of the broadcast keeps its copy: each is one that went unread.
            await self.broker.keep_dead(self.exchange, message, reason)
            return
        self.pump.inbox.put_nowait(event)

    async def cancel(self) -> None:
        queue, tag, self.tag = self.amqp_queue, self.tag, None
        if queue is not None and tag is not None:
            await self.broker.on_the_way_out(lambda: queue.cancel(tag))
        await self.pump.stop()
        self.broker.followers.discard(self)


class RunFollower:
    """The status events of one run, from the process's shared status queue."""

    def __init__(
        self,
        statuses: StatusQueue,
        run_id: str,
        handler: StatusHandler,
        unreadable: UnreadableStatusHandler | None = None,
    ) -> None:
        self.statuses = statuses
        self.pump = StatusPump(run_id, handler, unreadable)

    @property
    def active(self) -> bool:
        return self.pump.active

    async def start(self) -> None:
        self.pump.start()
        await self.statuses.add(self.pump)

    async def cancel(self) -> None:
        self.statuses.remove(self.pump)
        await self.pump.stop()
        self.statuses.broker.followers.discard(self)


class StatusQueue:
    """One exclusive queue for the status events of every run this process follows.

    A run followed adds a binding by its id (one broker round trip) where a queue of its
    own took three (declare, bind, consume) and a fourth to cancel. The binding goes when
    the run's last follower does, in the background: an ``add`` of the same run waits for
    it first, so that bindings and unbindings of one run reach the broker in order.
    """

    def __init__(
        self,
        broker: RabbitMQBroker,
        channel: Callable[[], Awaitable[AbstractRobustChannel]],
        exchange: str,
    ) -> None:
        self.broker = broker
        self.channel = channel
        self.exchange = exchange
        self.queue: AbstractQueue | None = None
        self.pumps: dict[str, set[StatusPump]] = {}
        # The last binding or unbinding of each run, while it is under way.
        self.changes: dict[str, asyncio.Task[None]] = {}
        self._declaring = asyncio.Lock()

    async def _declared(self) -> AbstractQueue:
        async with self._declaring:
            if self.queue is None:
                channel = await self.channel()
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.consume(self._on_message, no_ack=True)
                self.queue = queue
            return self.queue

    async def add(self, pump: StatusPump) -> None:
        """Hand ``pump`` its run's status events from now on (once this returns)."""
        queue = await self._declared()
        key = pump.run_id
        pumps = self.pumps.setdefault(key, set())
        first = not pumps
        pumps.add(pump)
        if first:
            self._change(key, lambda: queue.bind(self.exchange, routing_key=key))
        change = self.changes.get(key)
        if change is not None:
            await asyncio.shield(change)

    def remove(self, pump: StatusPump) -> None:
        """Stop handing ``pump`` events; unbind its run if nobody else here follows it."""
        key = pump.run_id
        pumps = self.pumps.get(key)
        if pumps is None or pump not in pumps:
            return
        pumps.discard(pump)
        if pumps:
            return
        del self.pumps[key]
        queue = self.queue
        if queue is not None:
            self._change(key, lambda: self._unbind(queue, key))

    async def _unbind(self, queue: AbstractQueue, key: str) -> None:
        try:
            await self.broker.on_the_way_out(lambda: queue.unbind(self.exchange, routing_key=key))
        except Exception as exc:  # a binding left behind only brings events nobody reads
            log.info("status binding not removed", run_id=key, error=f"{type(exc).__name__}")

    def _change(self, key: str, call: Callable[[], Awaitable[object]]) -> None:
        before = self.changes.get(key)

        async def change() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            await call()

        task = asyncio.create_task(change(), name=f"status-binding:{key}")
        self.changes[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self.changes.get(key) is finished:
                del self.changes[key]
            if not finished.cancelled():
                finished.exception()  # retrieved: a failed bind is raised to its add()

        task.add_done_callback(done)

    async def close(self) -> None:
        """Let the unbindings under way end (each waits ``GOODBYE_TIMEOUT_S`` at most, and
        none while the broker is unreachable): aiormq closes a channel whose call is
        cancelled. The queue goes with the connection."""
        await asyncio.gather(*self.changes.values(), return_exceptions=True)
        self.pumps.clear()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        pumps = self.pumps.get(message.routing_key or "")
        if not pumps:
            return  # a run nobody here follows any more
        try:
            event: Event | Unreadable = parse_event(message.body)
        except MalformedEvent as exc:
            log.warning("malformed status event", message_id=message.message_id, reason=str(exc))
            found = unreadable_of(message, str(exc))
            if found is None or found.identity.run_id != message.routing_key:
                return
            event = found
        for pump in pumps:
            pump.inbox.put_nowait(event)


def unreadable_of(message: AbstractIncomingMessage, reason: str) -> Unreadable | None:
    """``message``, which is not an event this release reads for ``reason``, as far as it can
    be read: whose it is and its sender's release; None if not even its run can be named."""
    identity = read_identity(message.body)
    if identity is None:
        return None
    sender = read_version((message.headers or {}).get(VERSION_HEADER))
    return unreadable(identity, reason, sender)


def lost_deliveries(message: AbstractIncomingMessage) -> int:
    """Deliveries of ``message`` that ended unsettled, as its header says (0 if none or junk)."""
    value = (message.headers or {}).get(DELIVERIES_HEADER, 0)
    return value if isinstance(value, int) and 0 <= value < 1_000_000 else 0


def copy_of(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    """A persistent copy of ``message`` with ``headers`` added to its own."""
    return aio_pika.Message(
        message.body,
        headers={**(message.headers or {}), **headers},
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        type=message.type,
    )
