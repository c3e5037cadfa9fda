"""What the controller does with a message it cannot read (most likely a newer release's)
whose run it can name: it acts on a stand-in built from the part it can read, so that
nobody waits for ever, and the message itself goes to the dead letters."""

from __future__ import annotations

from conveyor.contracts import (
    Delivery,
    RunRequested,
    StepFailed,
    Unreadable,
    UnreadableDelivery,
    WorkerFacts,
)
from conveyor.contracts.events import StepsDone
from conveyor.workers.release import attempts_refused, cannot_read

UNNAMED_PIPELINE = "unknown"
"""The pipeline recorded for a request that is unreadable down to its pipeline's name."""


UNKNOWN_WORKER = WorkerFacts(worker="unknown", pid=0)
"""Who reported an attempt whose report this controller cannot read."""

StandIn = RunRequested | StepFailed | StepsDone
"""What the controller acts on in place of a message it cannot read: a ``StepsDone`` is taken
apart as one it read would be."""


def stand_in(message: Unreadable) -> tuple[StandIn, str] | None:
    """What this controller acts on in place of a message it cannot read (most likely a
    newer release's), and why: a request's run is recorded failed, so that its client stops
    waiting; an attempt a worker reported is failed without a retry (any worker of that
    release would report it so again), and so is each of a ``StepsDone``'s whose step and
    attempt could be read. None for the rest, which nobody waits on (a heartbeat, a
    cancellation): they only go to the dead letters."""
    who, said, version = message.identity, message.reason, message.sender_version
    if who.type == "RunRequested":
        error = cannot_read("controller", "request", "client", said, version)
        # What could be read of it: enough to record its run, as one whose pipeline does not
        # compile is recorded.
        return RunRequested(run_id=who.run_id, pipeline=who.pipeline or UNNAMED_PIPELINE), error
    if who.type in ("StepSucceeded", "StepFailed", "StepsDone"):
        error = cannot_read("controller", f"worker's {who.type}", "worker", said, version)
        failed = attempts_refused(who, error, UNKNOWN_WORKER)
        if len(failed) > 1:
            return StepsDone(run_id=who.run_id, outcomes=failed), error
        return (failed[0], error) if failed else None
    return None


class UnreadableMessage:
    """A message this controller cannot read, whose run it can name, with its stand-in
    ``event``: in the inbox beside the deliveries, and settled as they are, always into the
    dead letters (once its stand-in is recorded, or if that cannot be done)."""

    __slots__ = ("delivery", "error", "event")

    def __init__(self, delivery: UnreadableDelivery, event: StandIn, error: str) -> None:
        self.delivery = delivery
        self.event = event
        self.error = error

    @property
    def deliveries(self) -> int:
        return 1  # not counted: it is dead-lettered whatever happens

    async def ack(self) -> None:
        await self.delivery.reject()

    async def reject(self, reason: str) -> None:
        await self.delivery.reject(reason)

    async def requeue(self) -> None:
        await self.delivery.requeue()


Inbound = Delivery | UnreadableMessage
"""What the controller takes from its queues: a delivery, or an unreadable message's stand-in."""
