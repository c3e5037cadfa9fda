"""What the controller does when a batch fails: find the message to blame, or wait.

A batch that fails while its events are recorded but not yet published failed for want of
the broker; one that fails while the store does not answer failed for want of the store. In
both cases no message is to blame: the deliveries are handed back and the controller pauses,
longer after each failure in a row, and says why meanwhile (``BatchFailures.problem``).
Otherwise the batch is taken apart: a message that fails alone, twice, while the store
answers and the broker takes the events, is what failed it, and goes to the dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from conveyor.service.store import Database, Writes, is_store_failure, store_error
from conveyor.service.unreadable import Inbound
from conveyor.workers.backoff import Backoff
from conveyor.workers.loggers import get_logger

# The controller's own logger: these are the controller's decisions, and operators filter
# its logs by this name.
log = get_logger("conveyor.controller")

BACK_OFF_S = 0.5
"""First pause after a batch failed for want of the store or the broker; it doubles with
each failure in a row, up to ``BACK_OFF_MAX_S``."""
BACK_OFF_MAX_S = 30.0


def being_cancelled() -> bool:
    """Whether the current task was asked to stop (not a library's stray cancellation)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def failure_reason(error: BaseException, store_path: Path) -> str:
    """``error`` as the reason a batch could not be processed: a failing store's error
    names the store and what to do about it."""
    if is_store_failure(error):
        return str(store_error(store_path, error))
    return f"{type(error).__name__}: {error}"


class BatchFailures:
    """The controller's answer to a failed batch.

    ``process`` records and acks deliveries, as the controller does a batch; ``forget``
    drops the controller's states in memory after a failure (they may be ahead of the
    store); ``unpublished`` says whether recorded events still wait to be published.
    """

    def __init__(
        self,
        db: Database,
        stack_name: str,
        *,
        process: Callable[[list[Inbound]], Awaitable[None]],
        forget: Callable[[], None],
        unpublished: Callable[[], bool],
    ) -> None:
        self._db = db
        self._stack_name = stack_name
        self._process = process
        self._forget = forget
        self._unpublished = unpublished
        self._backoff = Backoff(BACK_OFF_S, BACK_OFF_MAX_S)
        self.problem: str | None = None
        """Why the controller cannot get on (and when it tries again); None while it can."""

    async def failed(self, batch: list[Inbound], error: BaseException) -> None:
        """Deal with ``batch`` (none: a due retry or a lease check), which failed with
        ``error``; called where ``error`` is being handled, so its traceback is logged."""
        if not is_store_failure(error):  # a failing store is logged as it backs off
            log.exception("batch failed", size=len(batch))
        # The states in memory may be ahead of the store: they reload.
        self._forget()
        if self._unpublished():
            # Recorded but not published: the broker failed, not a message.
            await self._back_off(batch, f"the broker did not take the events: {error}")
        elif batch:
            await self._narrow(batch)
        else:  # a due retry or lease check failed: the store or the broker did
            await self._back_off([], f"{type(error).__name__}: {error}")

    async def _back_off(self, deliveries: list[Inbound], reason: str) -> None:
        """Hand ``deliveries`` back and pause, longer after each failure in a row."""
        # Nothing of these was acked, so all of it comes back.
        for delivery in deliveries:
            await delivery.requeue()
        delay = self._backoff.failed()
        attempt = self._backoff.attempt
        self.problem = f"{reason} (failed {attempt} time(s) in a row; next try in {delay:.1f}s)"
        log.warning(
            "controller unhealthy: backing off",
            attempt=attempt,
            retry_in_s=round(delay, 2),
            error=reason,
            stack=self._stack_name,
        )
        await asyncio.sleep(delay)

    def recovered(self) -> None:
        """A batch went through: the controller gets on again."""
        if self.problem is not None:
            log.info("controller healthy again", after_attempts=self._backoff.attempt)
        self.problem = None
        self._backoff.reset()

    async def _narrow(self, batch: list[Inbound]) -> None:
        """Process a failed batch one delivery at a time: a message that fails alone, twice,
        while the store answers, is what failed the batch, and goes to the dead letters."""
        for index, delivery in enumerate(batch):
            error = await self._alone(delivery)
            if error is None:
                continue
            # A full, locked or damaged store fails every message: none of them is to blame.
            if not is_store_failure(error) and await self._store_answers():
                error = await self._alone(delivery)
                if error is None:
                    continue
                if (
                    not is_store_failure(error)
                    and not self._unpublished()
                    and await self._store_answers()
                ):
                    reason = f"{type(error).__name__}: {error}"
                    log.error("dead-lettering the message that fails its batch", error=reason)
                    await delivery.reject(f"the controller cannot process it: {reason}")
                    continue
            await self._back_off(batch[index:], failure_reason(error, self._db.path))
            return
        self.recovered()

    async def _alone(self, delivery: Inbound) -> BaseException | None:
        """Process one delivery; what went wrong, or None."""
        try:
            await self._process([delivery])
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                raise
            self._forget()
            return exc
        return None

    async def _store_answers(self) -> bool:
        probe = Writes()
        probe.add("UPDATE settings SET value = value WHERE 0", [()])
        try:
            await self._db.write(probe)
        except Exception:
            return False
        return True
