"""The controller's timers: leases of running attempts, and step retries that wait.

A running attempt holds a lease, renewed by its worker's heartbeats; a step whose lease
lapsed is tried again, or fails once its attempts were lost ``max_lost`` times. A step that
waits for its retry is dispatched when the retry falls due: no worker holds it meanwhile.
The controller waits for events until the next of these falls due (``RunTimers.due``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from conveyor.contracts import utcnow
from conveyor.service import scheduling
from conveyor.service.batches import Batch
from conveyor.service.run_state import RunState, Transition
from conveyor.workers.loggers import get_logger

# The controller's own logger: these are the controller's decisions, and operators filter
# its logs by this name.
log = get_logger("conveyor.controller")

LEASE_S = 30.0
"""How long a running attempt is the worker's without a heartbeat."""
MAX_LOST = 3
"""Lapsed leases after which a step fails instead of being tried again."""


class RunTimers:
    """The leases and waiting retries of the runs in ``states`` (the controller's, shared).

    ``commit`` records a batch as the controller does; ``state_of`` is a run's state,
    loaded if it is not in ``states``, or None if the run is unknown.
    """

    def __init__(
        self,
        states: dict[str, RunState],
        *,
        commit: Callable[[Batch], Awaitable[None]],
        state_of: Callable[[str], Awaitable[RunState | None]],
        lease_s: float = LEASE_S,
        max_lost: int = MAX_LOST,
    ) -> None:
        self._states = states
        self._commit = commit
        self._state_of = state_of
        self._lease = timedelta(seconds=lease_s)
        self._max_lost = max_lost
        # Leases are checked a few times per lease; a check that comes much later than
        # planned means this process was stalled, and the leases are extended by as much.
        self._check_every = lease_s / 4
        self._next_check = 0.0
        # When each run's first waiting retry is due. Kept apart from the states, which a
        # failed batch clears: a run that only waits hears no event that would reload it.
        self._retries: dict[str, datetime] = {}

    def start(self, now: float) -> None:
        """Plan the first lease check, a period after ``now`` (the event loop's clock)."""
        self._next_check = now + self._check_every

    def due(self, now: float) -> float:
        """When, on the event loop's clock (``now`` being now), the next lease check or
        waiting retry falls due."""
        due = self._next_check
        if self._retries:
            wait = (min(self._retries.values()) - utcnow()).total_seconds()
            due = min(due, now + wait)
        return due

    def grant(self, state: RunState) -> None:
        """Give the running attempts of a (re)loaded run a full lease from now."""
        scheduling.grant_leases(state, utcnow() + self._lease)

    def renew(self, state: RunState, step: str, attempt: int, now: datetime) -> None:
        """Renew the lease of ``attempt`` of ``step``, whose worker was heard at ``now``."""
        scheduling.renew_lease(state, step, attempt, now + self._lease)

    async def check_leases(self) -> None:
        """Start new attempts of the steps whose worker stopped renewing its lease."""
        now = asyncio.get_running_loop().time()
        if now < self._next_check:
            return
        late = now - self._next_check
        self._next_check = now + self._check_every
        if late > self._lease.total_seconds() / 2:
            log.warning("controller was stalled; extending every lease", stalled_s=round(late, 1))
            for state in self._states.values():
                scheduling.extend_leases(state, timedelta(seconds=late))
            return
        batch = Batch(now=utcnow())
        for run_id, state in list(self._states.items()):
            change = scheduling.expire_leases(state, batch.now, max_lost=self._max_lost)
            if change.steps:
                log.warning("leases lapsed", run_id=run_id, steps=[u.name for u in change.steps])
                batch.change(run_id, change)
        if batch.changes:
            await self._commit(batch)

    async def dispatch_retries(self) -> None:
        """Dispatch the attempts whose retry is due; no worker held them while they waited."""
        now = utcnow()
        due = [run_id for run_id, at in self._retries.items() if at <= now]
        if not due:
            return
        batch = Batch(now=now)
        for run_id in due:
            state = await self._state_of(run_id)
            if state is not None:
                batch.change(run_id, scheduling.dispatch_due_retries(state, now))
        await self._commit(batch)
        for run_id in due:
            self.note_retry(run_id)

    def note_retry(self, run_id: str) -> None:
        """Note when the run's first waiting retry is due (it has none: forget the run)."""
        state = self._states.get(run_id)
        due = scheduling.next_retry(state) if state is not None else None
        if due is None:
            self._retries.pop(run_id, None)
        else:
            self._retries[run_id] = due

    def changed(self, run_id: str, change: Transition) -> None:
        """Note a recorded ``change`` of the run: a retry it set to wait, or ended."""
        # Only runs with a retry that waits, or had one: the rest cost nothing more.
        if run_id in self._retries or any(u.retry_at for u in change.steps):
            self.note_retry(run_id)
