"""The outcomes of the steps of one message with siblings, sent together.

A fan-out's branches travel a dozen to a message (``StepReady.siblings``); each runs in a
slot of its own and ends when it ends. Their outcomes go out in one ``StepsDone`` once every
step of the message still running has one to send, or ``held_s`` after the first was
held, whichever comes first. The message is acked only once all of them are confirmed, so
a worker that dies meanwhile has it delivered again, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from conveyor.contracts import Broker, Event, StepFailed, StepSucceeded

Outcome = StepSucceeded | StepFailed


class SiblingReports:
    """Collects the outcomes of a message's steps; each caller of :meth:`report` returns
    once the message that carried its outcomes is confirmed (or raises what it raised)."""

    __slots__ = (
        "_broker",
        "_held",
        "_held_s",
        "_holding",
        "_one_message",
        "_running",
        "_sent",
        "_waiting",
    )

    def __init__(
        self,
        broker: Broker,
        steps: int,
        held_s: float,
        one_message: Callable[[Sequence[Outcome]], Event],
    ) -> None:
        self._broker = broker
        self._running = steps  # the steps that have not ended yet, reporting or not
        self._held: list[Outcome] = []
        self._held_s = held_s
        self._one_message = one_message
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
            self._holding = asyncio.get_running_loop().call_later(self._held_s, self._flush)

    def _flush(self) -> None:
        if self._holding is not None:
            self._holding.cancel()
            self._holding = None
        held, self._held = self._held, []
        sent, self._sent = self._sent, None
        self._waiting = 0
        if not held or sent is None:
            return
        publish = asyncio.ensure_future(self._broker.publish([self._one_message(held)]))
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
