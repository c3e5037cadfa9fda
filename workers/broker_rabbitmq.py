"""The ``rabbitmq`` orchestrator flavor: a Broker on RabbitMQ, through aio-pika.

Semantics match the in-process broker. Publishing is persistent, confirmed, and
``mandatory`` (an unroutable work message is an error, not a silent loss); a batch of
events is published at once and its confirms gathered. Consumers settle every message
explicitly; a message that is not a valid event goes to the dead-letter queue with the
reason in a header. The connection is robust: it reconnects and re-registers consumers,
and this module keeps strong references to everything aio-pika must restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from conveyor.contracts import (
    ConflictError,
    ConveyorError,
    DeliveryHandler,
    Event,
    MalformedEvent,
    StatusHandler,
    StepReady,
    Topology,
    encode_event,
    is_control_event,
    is_status_event,
    parse_event,
)
from conveyor.workers.backoff import Backoff
from conveyor.workers.crash import crash_point
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.rabbitmq_topology import (
    DELIVERIES_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    Declared,
    declare_topology,
    declare_work_queue,
    queue_arguments,
)
from conveyor.workers.status_pump import StatusPump

log = structlog.get_logger("conveyor.broker.rabbitmq")

CONNECT_TIMEOUT_S = 10.0
"""One connection attempt (TCP and AMQP handshake) gives up after this long."""
GOODBYE_TIMEOUT_S = 5.0
"""Longest wait for the broker to answer a cancel or a close while stopping."""

# Errors after which the same operation can succeed once the robust connection is back.
TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class BrokerUnavailable(ConveyorError):
    """The broker did not take a message in time; the caller may try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


RETRYABLE = (*TRANSIENT, BrokerUnavailable)


def _live_consumer_tags(channel: AbstractRobustChannel) -> Mapping[str, object]:
    # aio-pika has no public view of the consumers the broker still delivers to: the
    # underlay channel's table is where a lost or broker-cancelled consumer disappears.
    underlay = getattr(channel, "_channel", None)
    amqp_channel = getattr(underlay, "channel", None)
    if amqp_channel is None or amqp_channel.is_closed:
        return {}
    consumers: Mapping[str, object] = amqp_channel.consumers
    return consumers


class _Delivery:
    __slots__ = ("_consumer", "_event", "_message", "_settled")

    def __init__(self, consumer: _Consumer, message: AbstractIncomingMessage, event: Event) -> None:
        self._consumer = consumer
        self._message = message
        self._event = event
        self._settled = False

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
        if self._settle():
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

    async def reject(self, reason: str) -> None:
        if self._settle():
            await self._consumer.broker.dead_letter(self._consumer.queue, self._message, reason)

    async def requeue(self) -> None:
        if not self._settle():
            return
        if isinstance(self._event, StepReady):
            # Handed back on purpose, not lost: a requeue would count as a lost delivery.
            await self._consumer.broker.put_back(
                self._consumer.queue, self._message, lost_deliveries(self._message)
            )
            return
        # A closed channel requeues it anyway.
        with contextlib.suppress(*TRANSIENT):
            await self._message.nack(requeue=True)


class _Consumer:
    """One consumer on its own channel, so that its prefetch and failures stay its own."""

    def __init__(
        self, broker: RabbitMQBroker, queue: str, handler: DeliveryHandler, prefetch: int
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.handler = handler
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
            await self.broker.dead_letter(self.queue, message, str(exc))
            return
        if message.redelivered and isinstance(event, StepReady):
            # Its last delivery ended unsettled: a worker died or lost the broker while it
            # held it. Classic queues do not count that, so the count travels in a header of
            # a copy; the worker that gets the copy decides whether to run it again.
            await self.broker.put_back(self.queue, message, lost_deliveries(message) + 1)
            return
        delivery = _Delivery(self, message, event)
        if self.hands_over:
            try:
                self.handler(delivery)
            except Exception as exc:
                await self._failed(delivery, exc)
            return
        task = asyncio.create_task(self._handle(delivery))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery: _Delivery) -> None:
        try:
            pending = self.handler(delivery)
            if pending is not None:
                await pending
        except Exception as exc:
            await self._failed(delivery, exc)

    async def _failed(self, delivery: _Delivery, exc: Exception) -> None:
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
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.broker.consumers.discard(self)


class _Follower:
    """Status events of one run, through an exclusive queue bound by the run id; or, bound
    to the control exchange, the control events of the stack."""

    def __init__(
        self, broker: RabbitMQBroker, run_id: str, handler: StatusHandler, exchange: str
    ) -> None:
        self.broker = broker
        self.exchange = exchange
        self.pump = StatusPump(run_id, handler)
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
            self.pump.inbox.put_nowait(parse_event(message.body))
        except MalformedEvent as exc:
            log.warning("malformed status event", message_id=message.message_id, reason=str(exc))

    async def cancel(self) -> None:
        queue, tag, self.tag = self.amqp_queue, self.tag, None
        if queue is not None and tag is not None:
            await self.broker.on_the_way_out(lambda: queue.cancel(tag))
        await self.pump.stop()
        self.broker.followers.discard(self)


class RabbitMQBroker:
    """A Broker on one stack's topology in RabbitMQ.

    Lifecycle: ``start()`` connects and declares the topology; ``stop()`` is idempotent and
    safe before ``start()``.
    """

    def __init__(
        self, topology: Topology, config: RabbitMQOrchestratorConfig, *, name: str | None = None
    ) -> None:
        self._topology = topology
        self.config = config
        self.name = name or f"conveyor {socket.gethostname()}:{os.getpid()}"
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._follow_channel: AbstractRobustChannel | None = None
        self._declared: Declared | None = None
        self._declare_lock = asyncio.Lock()
        self.consumers: set[_Consumer] = set()
        self.followers: set[_Follower] = set()
        self._lost_at: float | None = None
        self._reconnecting = self._new_backoff()

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise ConveyorError("the RabbitMQ broker is not started")
        return self._connection

    @property
    def declared(self) -> Declared:
        if self._declared is None:
            raise ConveyorError("the RabbitMQ broker is not started")
        return self._declared

    @property
    def safe_url(self) -> str:
        """The broker's URL without its password, for logs and errors."""
        return _safe_url(self.config.url.get_secret_value())

    async def start(self) -> None:
        """Connect (robustly) and declare the stack's exchanges and queues, in one attempt.

        Raises :class:`BrokerUnavailable` if the broker does not answer; see
        :meth:`start_patiently` to wait for it instead.
        """
        if self._connection is not None:
            return
        url = self.config.url.get_secret_value()
        try:
            connection = await aio_pika.connect_robust(
                url,
                timeout=CONNECT_TIMEOUT_S,
                reconnect_interval=self.config.reconnect_interval_s,
                client_properties={"connection_name": self.name},
                heartbeat=self._heartbeat(url),
            )
        except (*TRANSIENT, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {_safe_url(url)}: {type(exc).__name__}: {exc}"
            ) from None
        self._connection = connection
        connection.reconnect_callbacks.add(self._on_reconnect)
        connection.close_callbacks.add(self._on_lost)
        try:
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._declared = await declare_topology(
                self._channel, self._topology, self.config.pools
            )
        except BaseException:
            await self.stop()
            raise
        log.info("connected to RabbitMQ", url=_safe_url(url), stack=self._topology.stack)

    def _heartbeat(self, url: str) -> int | None:
        """The AMQP heartbeat, unless the URL sets one: about a lease, so that the broker
        drops a frozen process's connection (and requeues what it held) within one, also
        when it froze before it announced its step."""
        if "heartbeat=" in url:
            return None
        return max(2, round(self.config.lease_s))

    async def start_patiently(self, stop: asyncio.Event | None = None) -> bool:
        """:meth:`start`, trying again with capped exponential backoff and jitter until the
        broker answers; False if ``stop`` was set first.

        Each attempt is logged with its number and the pause before the next one. With the
        orchestrator's ``reconnect_timeout_s``, raises :class:`BrokerUnavailable` once the
        broker has not answered for that long.
        """
        config = self.config
        backoff = self._new_backoff()
        loop = asyncio.get_running_loop()
        began = loop.time()
        while True:
            try:
                await self.start()
                return True
            except RETRYABLE as exc:
                delay = backoff.failed()
                waited = loop.time() - began
                limit = config.reconnect_timeout_s
                if limit is not None and waited + delay > limit:
                    raise BrokerUnavailable(
                        f"RabbitMQ at {self.safe_url} did not answer for {waited:.0f}s "
                        f"({backoff.attempt} attempts; reconnect_timeout_s is {limit:g}): {exc}"
                    ) from None
                log.warning(
                    "waiting for RabbitMQ",
                    url=self.safe_url,
                    attempt=backoff.attempt,
                    retry_in_s=round(delay, 2),
                    error=str(exc),
                    stack=self._topology.stack,
                )
            if stop is None:
                await asyncio.sleep(delay)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return False

    @property
    def unreachable_for(self) -> float | None:
        """Seconds since the connection was lost (it is being re-established); None while
        connected."""
        if self._lost_at is None:
            return None
        return asyncio.get_running_loop().time() - self._lost_at

    def _new_backoff(self) -> Backoff:
        first = self.config.reconnect_interval_s
        return Backoff(first, max(first, self.config.reconnect_max_interval_s))

    def _on_lost(self, _: object, exc: BaseException | None = None) -> None:
        """The connection closed, or (while it is down) one more attempt failed."""
        connection = self._connection
        if connection is None:
            return  # closed by stop()
        error = f"{type(exc).__name__}: {exc}" if exc else None
        if self._lost_at is None:
            self._lost_at = asyncio.get_running_loop().time()
            self._reconnecting.reset()
            log.warning(
                "lost the connection to RabbitMQ; reconnecting",
                url=self.safe_url,
                error=error,
                stack=self._topology.stack,
            )
            return
        # aio-pika pauses ``reconnect_interval`` after each failed attempt, reading it
        # anew after it told its close callbacks (this one): setting it here paces its
        # attempts. (A connection parameter, not on the ABC.)
        pause = self._reconnecting.failed()
        setattr(connection, "reconnect_interval", pause)  # noqa: B010
        log.warning(
            "RabbitMQ still unreachable; reconnecting",
            url=self.safe_url,
            attempt=self._reconnecting.attempt,
            retry_in_s=round(pause, 2),
            down_for_s=round(self.unreachable_for or 0.0, 1),
            error=error,
            stack=self._topology.stack,
        )

    def _on_reconnect(self, *_: Any) -> None:
        down_for = self.unreachable_for
        self._lost_at = None
        if self._connection is not None:
            # aio-pika pauses once more after a success: the next loss starts short again.
            setattr(self._connection, "reconnect_interval", self.config.reconnect_interval_s)  # noqa: B010
        log.info(
            "reconnected to RabbitMQ",
            stack=self._topology.stack,
            down_for_s=None if down_for is None else round(down_for, 1),
            attempts=self._reconnecting.attempt + 1,
        )

    async def stop(self) -> None:
        """Cancel consumers and followers, then close the connection. Idempotent."""
        for consumer in list(self.consumers):
            await consumer.cancel()
        for follower in list(self.followers):
            await follower.cancel()
        connection, self._connection = self._connection, None
        self._lost_at = None
        self._channel = self._follow_channel = None
        self._declared = None
        if connection is not None:
            await connection.close()

    async def on_the_way_out(self, call: Callable[[], Awaitable[object]]) -> None:
        """Await ``call`` (a cancel or a close) unless the broker is unreachable, and for
        ``GOODBYE_TIMEOUT_S`` at most: aio-pika would hold it until the connection is back,
        and a process must stop whether its broker answers or not."""
        if self.unreachable_for is not None:
            return
        try:
            await asyncio.wait_for(call(), GOODBYE_TIMEOUT_S)
        except (*TRANSIENT, RuntimeError) as exc:  # aio-pika: RuntimeError once closed
            log.info("the broker did not answer while stopping", error=f"{type(exc).__name__}")

    async def pause(self) -> None:
        """Stop every consumer from receiving more, keeping their channels for acks."""
        for consumer in list(self.consumers):
            await consumer.pause()

    async def ensure_queue(self, name: str) -> None:
        """Declare (and bind) a work queue not declared at start, e.g. a new pool's."""
        declared = self.declared
        if name in declared.queues:
            return
        async with self._declare_lock:
            assert self._channel is not None
            await declare_work_queue(self._channel, self._topology, declared, name)

    def _message(self, event: Event) -> aio_pika.Message:
        return aio_pika.Message(
            encode_event(event),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
            type=event.type,
        )

    async def _publish_one(self, event: Event, message: aio_pika.Message) -> None:
        declared = self.declared
        if is_status_event(event):
            # Followers come and go: a status event nobody follows is dropped on purpose.
            await declared.status.publish(message, routing_key=event.run_id, mandatory=False)
            return
        if is_control_event(event):
            # Heard by the workers connected now; one that is not runs its attempt to the
            # end, and the controller ignores the outcome.
            await declared.control.publish(message, routing_key="", mandatory=False)
            return
        key = self._topology.route(event)
        if isinstance(event, StepReady) and key not in declared.queues:
            await self.ensure_queue(key)
        await declared.work.publish(message, routing_key=key, mandatory=True)

    async def _publish_each(
        self, pending: list[tuple[Event, aio_pika.Message]]
    ) -> list[BaseException | None]:
        """Publish every message at once; what each raised (None when confirmed)."""
        if len(pending) > 1:
            return await asyncio.gather(
                *(self._publish_one(event, message) for event, message in pending),
                return_exceptions=True,
            )
        # One message (each completion a worker reports) needs no task of its own.
        event, message = pending[0]
        try:
            await self._publish_one(event, message)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return [exc]
        except Exception as exc:
            return [exc]
        return [None]

    async def publish(self, events: Sequence[Event]) -> None:
        """Publish ``events`` at once; return when the broker confirmed every one.

        Interrupted publishes are retried once the connection is back (at-least-once);
        a message the broker returns as unroutable, or refuses, raises.
        """
        crash_point("before-publish", events)
        pending = [(event, self._message(event)) for event in events]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.publish_timeout_s
        while pending:
            results = await self._publish_each(pending)
            retry = []
            for (event, message), result in zip(pending, results, strict=True):
                if result is None:
                    continue
                # aiormq cancels the confirms still pending on a connection it gave up (no
                # frame within the heartbeat grace): that publish is lost, not cancelled. A
                # cancellation of this task would have been raised by gather() itself.
                if isinstance(result, (*TRANSIENT, asyncio.CancelledError)):
                    retry.append((event, message))
                elif isinstance(result, aiormq.exceptions.PublishError):
                    raise ConveyorError(
                        f"RabbitMQ could not route {event.type} {event.event_id} to "
                        f"{self._topology.route(event)!r}: is the topology declared?"
                    ) from result
                elif isinstance(result, aiormq.exceptions.DeliveryError):
                    raise BrokerUnavailable(
                        f"RabbitMQ refused {event.type} {event.event_id}: {result}"
                    ) from result
                else:
                    raise result
            pending = retry
            if pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"RabbitMQ did not confirm {len(pending)} message(s) "
                        f"within {self.config.publish_timeout_s:g}s"
                    )
                log.warning("publish interrupted; retrying on reconnect", messages=len(pending))
                assert self._channel is not None
                try:
                    await asyncio.wait_for(self._channel.ready(), timeout=remaining)
                except TimeoutError:
                    continue
        crash_point("after-publish", events)

    async def dead_letter(self, queue: str, message: AbstractIncomingMessage, reason: str) -> None:
        """Move ``message`` to the dead-letter queue with ``reason`` in a header, then ack it.

        Logged with the message id, never the body: the body may be large or sensitive.
        """
        log.warning(
            "dead-lettered", queue=queue, message_id=message.message_id, reason=reason[:500]
        )
        copy = _copy(message, {REASON_HEADER: reason[:1000], QUEUE_HEADER: queue})
        # If not published, the queue's own dead-letter exchange still takes the original,
        # only without our reason.
        await self._replace(message, copy, self.declared.dead, queue, requeue=False)

    async def put_back(self, queue: str, message: AbstractIncomingMessage, lost: int) -> None:
        """Requeue a copy of ``message`` that says ``lost`` deliveries ended unsettled, then
        ack the original (if the copy is not confirmed, the original is requeued instead)."""
        copy = _copy(message, {DELIVERIES_HEADER: lost})
        await self._replace(message, copy, self.declared.work, queue, requeue=True)

    async def _replace(
        self,
        message: AbstractIncomingMessage,
        copy: aio_pika.Message,
        exchange: AbstractExchange,
        key: str,
        *,
        requeue: bool,
    ) -> None:
        """Publish ``copy`` in place of ``message``, then ack the original; if the copy is
        not confirmed, the original is nacked (requeued, or dead-lettered by the queue)."""
        try:
            await exchange.publish(copy, routing_key=key, mandatory=True)
        except Exception as exc:
            log.warning(
                "copy not published; settling the original", requeue=requeue, error=str(exc)
            )
            with contextlib.suppress(*TRANSIENT):
                await message.nack(requeue=requeue)
            return
        with contextlib.suppress(*TRANSIENT):  # if lost: delivered again, handled again
            await message.ack()

    async def consume(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> _Consumer:
        """Consume ``queue`` on a channel of its own with ``prefetch`` unsettled at most."""
        if queue != self._topology.dead_letter_queue:
            await self.ensure_queue(queue)
        consumer = _Consumer(self, queue, handler, prefetch)
        self.consumers.add(consumer)
        try:
            await consumer.start(self.connection)
        except BaseException:
            await consumer.cancel()
            raise
        return consumer

    async def follow(self, run_id: str, handler: StatusHandler) -> _Follower:
        """Receive the status events of ``run_id`` (from now on) in order.

        Raises BrokerUnavailable while the connection is down: nothing can be followed,
        and a submit that follows its run first fails fast instead of waiting."""
        return await self._follow(run_id, handler, self._topology.status_exchange)

    async def listen(self, handler: StatusHandler) -> _Follower:
        """Receive the control events of the stack (from now on) in order."""
        return await self._follow("control", handler, self._topology.control_exchange)

    async def _follow(self, key: str, handler: StatusHandler, exchange: str) -> _Follower:
        down = BrokerUnavailable(
            f"RabbitMQ of stack {self._topology.stack!r} does not answer (reconnecting); "
            "try again once it is back"
        )
        if self.connection.is_closed:
            raise down
        follower = _Follower(self, key, handler, exchange)
        self.followers.add(follower)
        try:
            if self._follow_channel is None:
                self._follow_channel = await self.connection.channel(publisher_confirms=False)
            await follower.start(self._follow_channel)
        except (*TRANSIENT, RuntimeError) as exc:
            # aiormq says "<Connection ...> closed" with a RuntimeError when a channel is
            # asked of a connection that is down while the robust one still reconnects.
            await follower.cancel()
            raise down from exc
        except BaseException:
            await follower.cancel()
            raise
        return follower


def lost_deliveries(message: AbstractIncomingMessage) -> int:
    """Deliveries of ``message`` that ended unsettled, as its header says (0 if none or junk)."""
    value = (message.headers or {}).get(DELIVERIES_HEADER, 0)
    return value if isinstance(value, int) and 0 <= value < 1_000_000 else 0


def _copy(message: AbstractIncomingMessage, headers: Mapping[str, Any]) -> aio_pika.Message:
    """A persistent copy of ``message`` with ``headers`` added to its own."""
    return aio_pika.Message(
        message.body,
        headers={**(message.headers or {}), **headers},
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        type=message.type,
    )


def _safe_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
