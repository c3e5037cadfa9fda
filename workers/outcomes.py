"""How a worker sends the outcomes of the steps it ran, and settles their delivery.

A step that came alone publishes its outcome, then its delivery is acked. The steps of a
chain run in place on one delivery (:class:`Carrier`) and the steps of a message with
siblings (:class:`SiblingReports`) send theirs together, one ``StepsDone``, held
``HELD_S`` at most; a delivery is acked only once every outcome it brought is confirmed,
so that a worker that dies before has it delivered again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

from conveyor.contracts import (
    Broker,
    Delivery,
    Event,
    StepFailed,
    StepReady,
    StepStarted,
    StepSucceeded,
)
from conveyor.contracts.events import StepsDone, forwarded, trusted

Outcome = StepSucceeded | StepFailed
HELD_S = 0.1
"""How long the outcomes of a chain's steps run in place may wait to go out together (one
``StepsDone``): no longer than a step may run unannounced, by default."""


def one_message(outcomes: Sequence[Outcome]) -> Event:
    if len(outcomes) == 1:
        return outcomes[0]
    # Outcomes this worker made, of one run: not validated again.
    return trusted(StepsDone, run_id=outcomes[0].run_id, outcomes=list(outcomes))


class Answer:
    """What a worker publishes for an attempt it ran: its outcome and, when it succeeded,
    the StepReady of the step riding on it, forwarded once (a delivery of the attempt
    again, its ack lost, is answered with the outcome alone)."""

    __slots__ = ("forwarded", "next", "outcome")

    def __init__(self, outcome: Outcome, ready: StepReady) -> None:
        self.outcome = outcome
        self.next = None
        if isinstance(outcome, StepSucceeded):
            self.next = forwarded(ready, outcome.outputs)
        self.forwarded = False

    async def send(self, broker: Broker, held: Sequence[Outcome] = ()) -> None:
        """Publish the outcome (after ``held``, those of the steps run in place before it,
        in one message), and the rider's StepReady if not yet confirmed once; the outcome
        first, so that the controller hears of this step before its rider."""
        outcome = one_message([*held, self.outcome])
        if self.next is None or self.forwarded:
            await broker.publish([outcome])
            return
        await broker.publish([outcome, self.next])
        self.forwarded = True


async def _in_turn(
    previous: asyncio.Future[None] | None, publish: Coroutine[Any, Any, None]
) -> None:
    try:
        if previous is not None:
            await previous
    except BaseException:
        publish.close()  # never to run
        raise
    await publish


class Carrier:
    """A delivery whose riders run in place: their outcomes go out together (one message
    while the steps are quick, ``HELD_S`` at most apart), in their order, confirmed while
    the next runs, and the delivery is settled only once all of them are."""

    __slots__ = ("_broker", "_delivery", "_held", "_holding", "_riding", "_sending", "reports")

    def __init__(
        self, delivery: Delivery, broker: Broker, reports: SiblingReports | None = None
    ) -> None:
        self._delivery = delivery
        self._broker = broker
        # Where the outcomes go when the delivery is a step that came with siblings (None
        # for a step that came alone).
        self.reports = reports
        self._sending: asyncio.Future[None] | None = None
        # The answers whose rider runs (or ran) in place on this delivery.
        self._riding: list[Answer] = []
        # Outcomes not yet sent, and the timer that sends them.
        self._held: list[Outcome] = []
        self._holding: asyncio.TimerHandle | None = None

    @property
    def event(self) -> Event:
        return self._delivery.event

    @property
    def deliveries(self) -> int:
        return self._delivery.deliveries

    def _send(self, events: list[Event]) -> None:
        """Publish ``events`` once those sent before are confirmed, without waiting."""
        publish = self._broker.publish(events)
        self._sending = asyncio.ensure_future(_in_turn(self._sending, publish))

    def hold(self, outcome: Outcome) -> None:
        """Send ``outcome`` with those of the next steps run in place, ``HELD_S`` at most
        from now: a controller hears of a quick chain in one message, not one a step."""
        self._held.append(outcome)
        if self._holding is None:
            self._holding = asyncio.get_running_loop().call_later(HELD_S, self.flush)

    def take_held(self) -> list[Outcome]:
        """The outcomes held, no longer held: for the caller to send."""
        if self._holding is not None:
            self._holding.cancel()
            self._holding = None
        held, self._held = self._held, []
        return held

    def flush(self) -> None:
        """Send the outcomes held, without waiting."""
        held = self.take_held()
        if held:
            self._send([one_message(held)])

    async def announce(self, started: StepStarted) -> None:
        """Publish ``started`` once the outcomes of the steps before it are confirmed, so
        that the controller hears of those first; what their publish raised is theirs."""
        self.flush()
        if self._sending is not None:
            await asyncio.wait([self._sending])
        await self._broker.publish([started])

    def ride(self, answer: Answer) -> None:
        """``answer``'s rider runs next, in place, instead of being forwarded."""
        self._riding.append(answer)

    @property
    def failing(self) -> bool:
        """Whether a publish failed: nothing more runs on this delivery, given back."""
        sending = self._sending
        return sending is not None and sending.done() and sending.exception() is not None

    async def sent(self) -> None:
        """Send what is held; wait until everything sent is confirmed; raise what a
        publish raised."""
        self.flush()
        if self._sending is not None:
            await self._sending

    def abandon(self) -> None:
        """The delivery ends unsettled by this worker: what is still being sent goes on,
        and its failure, if any, is only retrieved (also one that is over already, else
        asyncio logs "Task exception was never retrieved"); what is held is not sent (the
        delivery comes again, and its steps with it)."""
        self.take_held()
        sending = self._sending
        if sending is not None:
            sending.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def ack(self) -> None:
        await self.sent()
        # Each rider run in place is handed on as if forwarded: its outcome (or what ended
        # it) is confirmed. A delivery of this attempt again, its ack lost with a channel,
        # is answered with the outcome alone, not with a rider to run a second time.
        for answer in self._riding:
            answer.forwarded = True
        await self._delivery.ack()

    async def reject(self, reason: str) -> None:
        await self.sent()
        await self._delivery.reject(reason)

    async def requeue(self) -> None:
        await self.sent()
        await self._delivery.requeue()


class SiblingReports:
    """The outcomes of the steps of one message with siblings (a fan-out's branches, a
    dozen to a message), each run in a slot of its own: sent in one ``StepsDone`` once every
    step of the message still running has one, or ``HELD_S`` after the first was held.
    Each caller of :meth:`report` returns once the message that carried its outcomes is
    confirmed (or raises what it raised)."""

    __slots__ = ("_broker", "_held", "_holding", "_running", "_sent", "_waiting")

    def __init__(self, broker: Broker, steps: int) -> None:
        self._broker = broker
        self._running = steps  # the steps that have not ended yet, reporting or not
        self._held: list[Outcome] = []
        self._holding: asyncio.TimerHandle | None = None
        self._sent: asyncio.Future[None] | None = None  # the publish the held ones join
        self._waiting = 0  # the steps whose outcomes are held

    async def report(self, outcomes: Sequence[Outcome]) -> None:
        """Send ``outcomes`` with those of the message's other steps; return once sent."""
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
        sent = self._sent
        self._held.extend(outcomes)
        self._waiting_changed(1)
        # Shielded: the future is every waiter's, and one waiter cancelled (its worker
        # stops) must not cancel it for the others.
        await asyncio.shield(sent)

    def ended(self) -> None:
        """One of the message's steps ended (after it reported, or without a report)."""
        self._running -= 1
        self._waiting_changed(0)

    def _waiting_changed(self, more: int) -> None:
        self._waiting += more
        if not self._held:
            return
        if self._waiting >= self._running:
            self._flush()
        elif self._holding is None:
            self._holding = asyncio.get_running_loop().call_later(HELD_S, self._flush)

    def _flush(self) -> None:
        if self._holding is not None:
            self._holding.cancel()
            self._holding = None
        held, self._held = self._held, []
        sent, self._sent = self._sent, None
        self._waiting = 0
        if not held or sent is None:
            return
        publish = asyncio.ensure_future(self._broker.publish([one_message(held)]))
        publish.add_done_callback(lambda done: _settle(sent, done))
        # Retrieved here too: every waiter may have been cancelled meanwhile.
        sent.add_done_callback(lambda done: done.cancelled() or done.exception())


def _settle(sent: asyncio.Future[None], publish: asyncio.Future[None]) -> None:
    if sent.done():
        return
    if publish.cancelled():
        sent.cancel()
        return
    error = publish.exception()
    if error is not None:
        sent.set_exception(error)
    else:
        sent.set_result(None)
