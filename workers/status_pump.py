"""Hands one run's status events to a follower's handler, one at a time, in order."""

from __future__ import annotations

import asyncio

from conveyor.contracts import Event, StatusHandler, Unreadable, UnreadableStatusHandler
from conveyor.workers.loggers import get_logger

log = get_logger("conveyor.broker")


class StatusPump:
    """The part of a follower that both brokers share: an inbox and the task that drains it.

    One task per follower keeps the handler's view of a run in publication order; a handler
    that raises is logged and the pump goes on.
    """

    def __init__(
        self, run_id: str, handler: StatusHandler, unreadable: UnreadableStatusHandler | None = None
    ) -> None:
        self.run_id = run_id
        self.handler = handler
        self.unreadable = unreadable
        # An unreadable event keeps its place among the others: what came before it is
        # handled before the follower hears of it.
        self.inbox: asyncio.Queue[Event | Unreadable] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"follow:{self.run_id}")

    async def _run(self) -> None:
        while True:
            event = await self.inbox.get()
            try:
                if isinstance(event, Unreadable):
                    if self.unreadable is not None:
                        self.unreadable(event)
                else:
                    await self.handler(event)
            except Exception:
                log.exception("status handler failed", run_id=self.run_id)

    async def stop(self) -> None:
        """Stop handing events over; idempotent."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
