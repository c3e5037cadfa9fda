"""A message of several events taken apart: a StepReady with siblings (a fan-out's
branches, a dozen to a message) for a worker, a worker's ``StepsDone`` (the outcomes of a
chain's steps run in place) for the controller.

Each event of the message is handed on as a delivery of its own (:class:`Part`); the
message is settled once all of them are: acked if every one was, dead-lettered if one was
refused. An event handed back (a worker stops, no slot came free in time, the controller
could not record its batch) is published as a message of its own, so that nothing settled
here is handled again for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.contracts import Broker, Delivery, Event
from conveyor.contracts.events import step_of
from conveyor.workers.loggers import get_logger

log = get_logger("conveyor.broker")


def parts(delivery: Delivery, broker: Broker, events: Sequence[Event]) -> list[Part]:
    """``events`` (those ``delivery``'s message carries) as deliveries of their own."""
    message = Parts(delivery, broker, len(events))
    return [Part(message, event) for event in events]


class Parts:
    """The message the events came in, settled once the last of them is."""

    __slots__ = ("_broker", "_delivery", "_left", "_lost", "_refused")

    def __init__(self, delivery: Delivery, broker: Broker, events: int) -> None:
        self._delivery = delivery
        self._broker = broker
        self._left = events
        self._refused: list[str] = []
        self._lost = False

    @property
    def deliveries(self) -> int:
        return self._delivery.deliveries

    async def hand_back(self, event: Event) -> None:
        try:
            await self._broker.publish([event])
        except Exception as exc:
            # The message goes back whole instead: what was handled here is handled again.
            log.warning("part not handed back", event_id=event.event_id, error=str(exc))
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
            also = f" (and {more} more of its events)" if more else ""
            await self._delivery.reject(self._refused[0] + also)
        else:
            await self._delivery.ack()


class Part:
    """One event of a message of several, as a delivery: settled once, with the rest."""

    __slots__ = ("_event", "_message", "_settled")

    def __init__(self, message: Parts, event: Event) -> None:
        self._message = message
        self._event = event
        self._settled = False

    @property
    def event(self) -> Event:
        return self._event

    @property
    def deliveries(self) -> int:
        return self._message.deliveries

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        return True

    async def ack(self) -> None:
        if self._settle():
            await self._message.settled()

    async def reject(self, reason: str) -> None:
        if self._settle():
            about = step_of(self._event) or self._event.type
            await self._message.settled(f"{about}: {reason}")

    async def requeue(self) -> None:
        if self._settle():
            await self._message.hand_back(self._event)
            await self._message.settled()
