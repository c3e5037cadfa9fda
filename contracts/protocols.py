"""The interfaces that adapters implement: broker, artifact store, materializer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from conveyor.contracts.events import Event
from conveyor.contracts.models import ArtifactRef
from conveyor.contracts.topology import Topology


class Delivery(Protocol):
    """One message handed to a consumer; it must be settled exactly once."""

    @property
    def event(self) -> Event:
        """The decoded event."""

    @property
    def redelivered(self) -> bool:
        """Whether the broker delivered this message before (to this or another consumer)."""

    async def ack(self) -> None:
        """Done with it: the broker forgets the message."""

    async def reject(self, reason: str) -> None:
        """It cannot be handled: it goes to the dead-letter queue with ``reason``."""

    async def requeue(self) -> None:
        """Give it back to be delivered again, to any consumer."""


DeliveryHandler = Callable[[Delivery], Awaitable[None] | None]
"""Called once per delivery, in delivery order. A coroutine function runs on a task of its
own for each delivery (long work never holds the consumer); a plain function, which should
only hand the delivery over, runs inline and costs no task. An exception rejects it."""
StatusHandler = Callable[[Event], Awaitable[None]]


class Subscription(Protocol):
    """A running consumer; cancel it to stop receiving."""

    @property
    def active(self) -> bool:
        """Whether the broker still delivers to this consumer."""

    async def cancel(self) -> None:
        """Stop receiving; unsettled deliveries are requeued by the broker. Idempotent."""


class Broker(Protocol):
    """A message broker bound to one stack's topology."""

    @property
    def topology(self) -> Topology:
        """The names this broker publishes to and consumes from."""

    async def start(self) -> None:
        """Connect and declare the topology (idempotent)."""

    async def stop(self) -> None:
        """Cancel consumers and disconnect. Idempotent and safe before ``start``."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Route and publish ``events``; returns once the broker confirmed every one."""

    async def consume(self, queue: str, handler: DeliveryHandler, *, prefetch: int) -> Subscription:
        """Deliver messages of ``queue`` to ``handler``, at most ``prefetch`` unsettled."""

    async def follow(self, run_id: str, handler: StatusHandler) -> Subscription:
        """Receive the status events of one run (``StepStatusChanged``, ``RunFinished``)."""


@runtime_checkable
class ArtifactStore(Protocol):
    """Where step outputs live as bytes. Blocking: callers run it off the event loop."""

    def put(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` atomically under its content address; return (uri, sha256)."""

    def get(self, uri: str, sha256: str) -> bytes:
        """The bytes at ``uri``, checked against ``sha256``; raise if missing or corrupted."""

    def path_of(self, uri: str) -> str:
        """The local path of ``uri`` if the store is a directory (for downloads)."""


class Materializer(Protocol):
    """Turns values of some types into bytes and back."""

    name: str

    def handles(self, value: object) -> bool:
        """Whether this materializer can write ``value``."""

    def dump(self, value: object) -> bytes:
        """The bytes of ``value``."""

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        """The value stored as ``data``."""
