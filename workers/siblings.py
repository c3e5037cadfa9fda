"""A StepReady with siblings (a fan-out's branches, a dozen to a message), taken apart.

Each step of the message is handed to the worker's runtime as a delivery of its own
(:class:`Sibling`); the message is settled once all of them are: acked if every one was,
dead-lettered if one was refused. A step handed back (the worker stops, or no slot came
free in time) is published as a message of its own, so that nothing settled here runs
again for it.
"""

from __future__ import annotations

from conveyor.contracts import Broker, Delivery, StepReady
from conveyor.workers.loggers import get_logger

log = get_logger("conveyor.worker")


class Siblings:
    """The message the steps came in, settled once the last of them is."""

    __slots__ = ("_broker", "_delivery", "_left", "_lost", "_refused")

    def __init__(self, delivery: Delivery, broker: Broker, steps: int) -> None:
        self._delivery = delivery
        self._broker = broker
        self._left = steps
        self._refused: list[str] = []
        self._lost = False

    def part(self, ready: StepReady) -> Sibling:
        return Sibling(self, ready)

    @property
    def deliveries(self) -> int:
        return self._delivery.deliveries

    async def hand_back(self, ready: StepReady) -> None:
        try:
            await self._broker.publish([ready])
        except Exception as exc:
            # The message goes back whole instead: a step that ran here runs again.
            log.warning("sibling not handed back", step=ready.step.name, error=str(exc))
            self._lost = True

    async def settled(self, refused: str | None = None) -> None:
        if refused is not None:
            self._refused.append(refused)
        self._left -= 1
        if self._left:
            return
        if self._lost:
            await self._delivery.requeue()
        elif self._refused:
            more = len(self._refused) - 1
            also = f" (and {more} more of its steps)" if more else ""
            await self._delivery.reject(self._refused[0] + also)
        else:
            await self._delivery.ack()


class Sibling:
    """One step of a message with siblings, as a delivery: settled once, with the rest."""

    __slots__ = ("_event", "_settled", "_siblings")

    def __init__(self, siblings: Siblings, event: StepReady) -> None:
        self._siblings = siblings
        self._event = event
        self._settled = False

    @property
    def event(self) -> StepReady:
        return self._event

    @property
    def deliveries(self) -> int:
        return self._siblings.deliveries

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        if self._settle():
            await self._siblings.settled()

    async def reject(self, reason: str) -> None:
        if self._settle():
            await self._siblings.settled(f"{self._event.step.name}: {reason}")

    async def requeue(self) -> None:
        if self._settle():
            await self._siblings.hand_back(self._event)
            await self._siblings.settled()
