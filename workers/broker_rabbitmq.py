"""The ``rabbitmq`` orchestrator flavor: a Broker on RabbitMQ, through aio-pika.

Semantics match the in-process broker. Publishing is persistent, confirmed, and
``mandatory`` (an unroutable work message is an error, not a silent loss); a batch of
events is published at once and its confirms gathered. Consumers (``rabbitmq_consumers``)
settle every message explicitly; a message that is not a valid event goes to the
dead-letter queue with the reason in a header. The connection is robust: it reconnects
and re-registers consumers, and this module keeps strong references to everything
aio-pika must restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from conveyor.contracts import (
    ConveyorError,
    DeliveryHandler,
    Event,
    Reachability,
    StatusHandler,
    StepReady,
    Topology,
    UnreadableHandler,
    UnreadableStatusHandler,
    encode_event,
    is_control_event,
    is_status_event,
)
from conveyor.workers.backoff import Backoff
from conveyor.workers.crash import crash_point
from conveyor.workers.loggers import get_logger
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.rabbitmq_consumers import (
    Consumer,
    Follower,
    Holding,
    RunFollower,
    StatusQueue,
    copy_of,
)
from conveyor.workers.rabbitmq_errors import RETRYABLE, TRANSIENT, BrokerUnavailable
from conveyor.workers.rabbitmq_topology import (
    DELIVERIES_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    VERSION_HEADER,
    Declared,
    declare_topology,
    declare_work_queue,
)
from conveyor.workers.release import conveyor_version

log = get_logger("conveyor.broker.rabbitmq")

CONNECT_TIMEOUT_S = 10.0
"""One connection attempt (TCP and AMQP handshake) gives up after this long."""
GOODBYE_TIMEOUT_S = 5.0
"""Longest wait for the broker to answer a cancel or a close while stopping."""


def _dead_copy(queue: str, message: AbstractIncomingMessage, reason: str) -> aio_pika.Message:
    """The copy of ``message`` (from ``queue``) that the dead-letter queue keeps, with
    ``reason`` in a header; logged with the message id, never the body (it may be large or
    sensitive)."""
    log.warning("dead-lettered", queue=queue, message_id=message.message_id, reason=reason[:500])
    return copy_of(message, {REASON_HEADER: reason[:1000], QUEUE_HEADER: queue})


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
        self.consumers: set[Consumer] = set()
        # What a StepReady that comes to any consumer of this process waits for: the
        # settling of a delivery it was sent from (a rider may go to another pool's queue).
        self.holding = Holding()
        self.followers: set[Follower | RunFollower] = set()
        self._statuses: StatusQueue | None = None
        self._lost_at: float | None = None
        self._reconnecting = self._new_backoff()

    @classmethod
    def of_stack(cls, stack: str, config: RabbitMQOrchestratorConfig) -> RabbitMQBroker:
        """The broker of the stack named ``stack``, whose orchestrator is ``config``."""
        return cls(Topology(stack=stack, prefix=config.prefix), config)

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

    async def reachability(self) -> Reachability:
        """Whether RabbitMQ answers now: a channel opens and closes."""
        down_for = self.unreachable_for
        if down_for is not None:
            return Reachability(
                False, f"RabbitMQ at {self.safe_url} unreachable for {down_for:.0f}s; reconnecting"
            )
        # The moments before this adapter notices a loss look the same to a user.
        lost = f"RabbitMQ at {self.safe_url} unreachable; reconnecting"
        try:
            connection = self.connection
            if connection.is_closed:
                return Reachability(False, lost)
            channel = await connection.channel()
            await channel.close()
        except Exception as exc:
            # Not the exception's text: aio-pika's names the connection, URL and all.
            return Reachability(False, f"{lost} ({type(exc).__name__})")
        return Reachability(True, "RabbitMQ answers")

    async def queue_depths(self) -> dict[str, int]:
        topology = self.topology
        names = sorted(self.declared.queues) or [topology.runs_queue, topology.events_queue]
        # A passive declare of a queue that vanished closes its channel: use a throwaway one.
        channel = await self.connection.channel()
        try:
            depths = {}
            for name in names:
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = int(queue.declaration_result.message_count or 0)
            return depths
        finally:
            if not channel.is_closed:
                await channel.close()

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
        statuses, self._statuses = self._statuses, None
        if statuses is not None:
            await statuses.close()
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
            headers={VERSION_HEADER: conveyor_version()},
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
        """Move ``message`` to the dead-letter queue with ``reason`` in a header, then ack it."""
        copy = _dead_copy(queue, message, reason)
        # If not published, the queue's own dead-letter exchange still takes the original,
        # only without our reason.
        await self._replace(message, copy, self.declared.dead, queue, requeue=False)

    async def keep_dead(self, source: str, message: AbstractIncomingMessage, reason: str) -> None:
        """Put a copy of ``message``, which came from ``source`` and needs no settling (a
        broadcast), in the dead-letter queue with ``reason``; if it cannot be, only logged."""
        copy = _dead_copy(source, message, reason)
        try:
            await asyncio.wait_for(
                self.declared.dead.publish(copy, routing_key=source, mandatory=True),
                self.config.publish_timeout_s,
            )
        except Exception as exc:
            log.warning("dead letter not kept", queue=source, error=f"{type(exc).__name__}: {exc}")

    async def put_back(self, queue: str, message: AbstractIncomingMessage, lost: int) -> None:
        """Requeue a copy of ``message`` that says ``lost`` deliveries ended unsettled, then
        ack the original (if the copy is not confirmed, the original is requeued instead)."""
        copy = copy_of(message, {DELIVERIES_HEADER: lost})
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

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        unreadable: UnreadableHandler | None = None,
    ) -> Consumer:
        """Consume ``queue`` on a channel of its own with ``prefetch`` unsettled at most;
        messages that are not an event this release reads, but whose run can be named, go
        to ``unreadable`` (else straight to the dead-letter queue)."""
        if queue != self._topology.dead_letter_queue:
            await self.ensure_queue(queue)
        consumer = Consumer(self, queue, handler, prefetch, unreadable)
        self.consumers.add(consumer)
        try:
            await consumer.start(self.connection)
        except BaseException:
            await consumer.cancel()
            raise
        return consumer

    async def follow(
        self,
        run_id: str,
        handler: StatusHandler,
        *,
        unreadable: UnreadableStatusHandler | None = None,
    ) -> RunFollower:
        """Receive the status events of ``run_id`` (from now on) in order; ``unreadable``
        hears of those this release cannot read, in their place.

        Raises BrokerUnavailable while the connection is down: nothing can be followed,
        and a submit that follows its run first fails fast instead of waiting."""
        follower = RunFollower(self._status_queue(), run_id, handler, unreadable)
        await self._started(follower, follower.start)
        return follower

    async def listen(
        self, handler: StatusHandler, *, unreadable: UnreadableStatusHandler | None = None
    ) -> Follower:
        """Receive the control events of the stack (from now on) in order; ``unreadable``
        hears of those this release cannot read, in their place."""
        follower = Follower(self, handler, self._topology.control_exchange, unreadable)

        async def start() -> None:
            await follower.start(await self._follow_on())

        await self._started(follower, start)
        return follower

    def _status_queue(self) -> StatusQueue:
        if self._statuses is None:
            self._statuses = StatusQueue(self, self._follow_on, self._topology.status_exchange)
        return self._statuses

    async def _follow_on(self) -> AbstractRobustChannel:
        """The channel of followers (no confirms: they publish nothing), opened once."""
        if self._follow_channel is None:
            self._follow_channel = await self.connection.channel(publisher_confirms=False)
        return self._follow_channel

    async def _started(
        self, follower: Follower | RunFollower, start: Callable[[], Awaitable[None]]
    ) -> None:
        down = BrokerUnavailable(
            f"RabbitMQ of stack {self._topology.stack!r} does not answer (reconnecting); "
            "try again once it is back"
        )
        if self.connection.is_closed:
            raise down
        self.followers.add(follower)
        try:
            await start()
        except (*TRANSIENT, RuntimeError) as exc:
            # aiormq says "<Connection ...> closed" with a RuntimeError when a channel is
            # asked of a connection that is down while the robust one still reconnects.
            await follower.cancel()
            raise down from exc
        except BaseException:
            await follower.cancel()
            raise


def _safe_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
