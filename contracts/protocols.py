"""The interfaces that adapters implement: broker, artifact store, materializer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from conveyor.contracts.events import Event
from conveyor.contracts.models import ArtifactRef, BlobRef
from conveyor.contracts.topology import Topology
from conveyor.contracts.unreadable import Unreadable

T = TypeVar("T")


class Delivery(Protocol):
    """One message handed to a consumer; it must be settled exactly once."""

    @property
    def event(self) -> Event:
        """The decoded event."""

    @property
    def deliveries(self) -> int:
        """How many times this message was delivered, this time included: a delivery that
        ended without being settled (its consumer died or lost the broker) counts."""

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


class UnreadableDelivery(Protocol):
    """A message that is not an event this release can read, though the run it belongs to
    can be named: handed to a consumer that asked for such (``consume(unreadable=...)``) so
    that it tells the run. Settle it exactly once."""

    @property
    def unreadable(self) -> Unreadable:
        """Whose it is, why it cannot be read, and its sender's release if known."""

    async def reject(self, reason: str | None = None) -> None:
        """Done with it: it goes to the dead-letter queue with the reason it could not be
        read (and ``reason``, if it could not be handled either)."""

    async def requeue(self) -> None:
        """Give it back to be delivered again (the broker was lost while handling it)."""


UnreadableHandler = Callable[[UnreadableDelivery], Awaitable[None] | None]
"""Called once per unreadable message whose run can be named, on a task of its own (they are
rare). An exception dead-letters the message; a broker lost meanwhile requeues it."""


UnreadableStatusHandler = Callable[[Unreadable], None]
"""Told of a status event of the followed run that is not one this release can read (most
likely a newer controller's), in its place among the run's other status events."""


class Subscription(Protocol):
    """A running consumer; cancel it to stop receiving."""

    @property
    def active(self) -> bool:
        """Whether the broker still delivers to this consumer."""

    async def cancel(self) -> None:
        """Stop receiving; unsettled deliveries are requeued by the broker. Idempotent."""


@dataclass(frozen=True)
class Reachability:
    """Whether a broker answers now, and a line for a person saying so."""

    ok: bool
    detail: str


class Broker(Protocol):
    """A message broker bound to one stack's topology."""

    @property
    def topology(self) -> Topology:
        """The names this broker publishes to and consumes from."""

    async def start(self) -> None:
        """Connect and declare the topology (idempotent)."""

    async def stop(self) -> None:
        """Cancel consumers and disconnect. Idempotent and safe before ``start``."""

    async def pause(self) -> None:
        """Stop every consumer from taking more messages, while the deliveries in hand can
        still be settled: the first step of a graceful stop. Idempotent."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Route and publish ``events``; returns once the broker confirmed every one."""

    async def consume(
        self,
        queue: str,
        handler: DeliveryHandler,
        *,
        prefetch: int,
        unreadable: UnreadableHandler | None = None,
    ) -> Subscription:
        """Deliver messages of ``queue`` to ``handler``, at most ``prefetch`` unsettled.

        A message that is not a valid event goes to the dead-letter queue with the reason;
        with ``unreadable``, one whose run can still be named goes there through it, so
        that the run hears of it."""

    async def follow(
        self,
        run_id: str,
        handler: StatusHandler,
        *,
        unreadable: UnreadableStatusHandler | None = None,
    ) -> Subscription:
        """Receive the status events of one run (``StepStatusChanged``, ``RunFinished``);
        with ``unreadable``, hear of those of the run this release cannot read, in order."""

    async def listen(
        self, handler: StatusHandler, *, unreadable: UnreadableStatusHandler | None = None
    ) -> Subscription:
        """Receive the control events broadcast to every worker of the stack, from now on
        (a listener that is disconnected meanwhile misses them); with ``unreadable``, hear
        of those this release cannot read whose run can be named, in order. Each one this
        release cannot read goes to the dead-letter queue with the reason, as a consumer's."""

    async def reachability(self) -> Reachability:
        """Whether the broker answers now, for health checks (no credentials in ``detail``)."""

    async def queue_depths(self) -> dict[str, int]:
        """Messages ready in each queue of the stack (unacked ones not counted), for metrics."""


@runtime_checkable
class ArtifactStore(Protocol):
    """Where step outputs and code archives live, named by content.

    Bytes move through local files, never whole in memory, so an object may be larger than
    the memory of the process. Blocking: callers run it off the event loop.
    """

    @property
    def location(self) -> str:
        """Where the bytes live, for messages: a directory, or a bucket and its endpoint."""

    def put(self, write: Callable[[str], str | None]) -> BlobRef:
        """Call ``write(path)`` to create a file at a fresh local ``path``, then store its
        bytes under their content address (atomically: no reader sees a partial object).
        ``write`` may return the digest of what it wrote, when it hashed the bytes on the way;
        else the store hashes the file."""

    def put_bytes(self, data: bytes) -> BlobRef:
        """Store small ``data`` under its content address."""

    def get_bytes(self, uri: str, digest: str) -> bytes:
        """The small object at ``uri`` in memory, verified against ``digest``."""

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        """``read(path)`` of a local file holding the bytes at ``uri``, verified against
        ``digest``; raises ArtifactUnreadable if they are missing, corrupted or outside."""

    def check(self) -> None:
        """Raise StoreUnavailable, saying what to check, if the store cannot be used."""


class Materializer(Protocol):
    """Turns values of some types into a file and back.

    ``name`` is recorded with every artifact it writes and finds it again to read one;
    ``version`` is recorded too: change it whenever the bytes it writes change.
    """

    name: str
    version: str

    def handles(self, value: object) -> bool:
        """Whether this materializer can write ``value``."""

    def save(self, value: object, path: str) -> str | None:
        """Write ``value`` to a new file at ``path``; return the digest of the bytes written
        if it hashed them on the way (see ``workers.digests``), else None."""

    def load(self, path: str, ref: ArtifactRef) -> object:
        """The value stored in the file at ``path``."""
