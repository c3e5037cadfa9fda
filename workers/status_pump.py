"""Hands one run's status events to a follower's handler, one at a time, in order."""

from __future__ import annotations

import asyncio

import structlog

from conveyor.contracts import Event, StatusHandler

log = structlog.get_logger("conveyor.broker")


class StatusPump:
    """The part of a follower that both brokers share: an inbox and the task that drains it.

    One task per follower keeps the handler's view of a run in publication order; a handler
    that raises is logged and the pump goes on.
    """

    def __init__(self, run_id: str, handler: StatusHandler) -> None:
        self.run_id = run_id
        self.handler = handler
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
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
                await self.handler(event)
            except Exception:
                log.exception("status handler failed", run_id=self.run_id)

    async def stop(self) -> None:
        """Stop handing events over; idempotent."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
