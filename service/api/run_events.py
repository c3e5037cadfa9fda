"""A run followed live over HTTP: server-sent events of its step changes and its end.

``GET /api/runs/{id}/events`` answers ``text/event-stream``: an ``event: step`` (a
``StepStatusChanged`` as JSON) for each step whose status or attempt changed, an ``event:
run`` (the run's record) once it finished, then the stream ends. A stream that was cut is
followed again from the start: a reconnected client is sent every step that left
``pending`` once more and drops what it has seen (a step, its status and its attempt say
what it saw).

The server reads its own store at a modest interval (``poll_interval_s``), once for all the
followers of a run (a ``RunWatch``), and each read after the first takes only what changed:
the run's change marker says whether anything did, and the steps that record a newer marker
are what did (``RunStore.step_changes``); a run still queued (no controller recorded it, so
it has no steps) costs a look at its request's id (``RunRequests.is_requested``), never the
request's spec. A follower of a 10,000-step fan-out so costs one or two small rows per
interval while nothing moves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    RunRecord,
    StepStatus,
    StepStatusChanged,
)
from conveyor.service.context import Services
from conveyor.service.public_records import public_run

KEEPALIVE_S = 15.0
"""A comment line at least this often: proxies keep the stream, the server sees a client gone."""


def _event(kind: str, data: str) -> str:
    # JSON holds no raw newline, so one data line each.
    return f"event: {kind}\ndata: {data}\n\n"


class RunWatch:
    """The store's view of one run's steps, read for all its followers by one task.

    ``changed`` names a step each time its status or attempt moved, in the order seen; the
    step's latest change is in ``current``. A follower walks ``changed`` from where it was
    and sends each step's latest change it has not sent, so one that lags sends a step's
    latest state, not every state in between (as a single reader of the store would).
    """

    def __init__(self, services: Services, run_id: str, interval_s: float) -> None:
        self._services = services
        self.run_id = run_id
        self._interval_s = interval_s
        self.current: dict[str, StepStatusChanged] = {}
        self.changed: list[str] = []
        self.finished: RunRecord | None = None
        self.failure: Exception | None = None
        self._marker: int | None = None
        """The run's change marker at the last read; ``None``: read every step next."""
        self._moved = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.followers = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=f"watch run {self.run_id}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        try:
            while True:
                await self.poll()
                self._wake()
                if self.finished is not None:
                    return
                await asyncio.sleep(self._interval_s)
        except Exception as exc:  # the run was deleted, the store failed: followers raise it
            self.failure = exc
            self._wake()

    def _wake(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def poll(self) -> None:
        """Read what changed since the last poll (everything, the first time)."""
        runs, requests = self._services.runs, self._services.run_requests
        # The run first: once it is finished, the steps read after it are final.
        seen = await runs.change_marker(self.run_id)
        if seen is None and await requests.is_requested(self.run_id):
            return  # queued: no step yet, nothing to send, and the request need not be read
        if seen is None:  # deleted or withdrawn (or recorded just now): get_run says which
            status = (await runs.get_run(self.run_id)).status
        else:
            status, marker = seen
            if marker != self._marker:
                changes, newest = await runs.step_changes(self.run_id, self._marker)
                self._marker = max(marker, newest)
                for change in changes:
                    self._take(change)
        if status in FINISHED_RUN_STATUSES:
            self.finished = public_run(await runs.get_run(self.run_id))

    def _take(self, change: StepStatusChanged) -> None:
        previous = self.current.get(change.step)
        if previous is None:
            # Pending from the start is no news; pending again after a failure is a retry.
            if change.status is StepStatus.PENDING and change.retry_at is None:
                return
        elif (previous.status, previous.attempt) == (change.status, change.attempt):
            return
        self.current[change.step] = change
        self.changed.append(change.step)

    async def follow(self, gone: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """One follower's events, until the run finished or the follower is ``gone``."""
        sent: dict[str, tuple[StepStatus, int]] = {}
        walked = 0
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        yield "retry: 1000\n\n"
        while not await gone():
            moved = self._moved  # before reading: a poll that ends meanwhile sets it
            while walked < len(self.changed):
                change = self.current[self.changed[walked]]
                walked += 1
                if sent.get(change.step) == (change.status, change.attempt):
                    continue
                sent[change.step] = (change.status, change.attempt)
                quiet_since = loop.time()
                yield _event("step", change.model_dump_json())
            if self.failure is not None:
                raise self.failure
            if self.finished is not None:
                yield _event("run", self.finished.model_dump_json())
                return
            if loop.time() - quiet_since >= KEEPALIVE_S:
                quiet_since = loop.time()
                yield ": keepalive\n\n"
            # Woken by the next poll; at the interval anyway, to see a follower gone.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), self._interval_s)


class RunWatches:
    """The ``RunWatch`` of each run followed in this server, while it has followers."""

    def __init__(self) -> None:
        self._watches: dict[str, RunWatch] = {}

    def __len__(self) -> int:
        return len(self._watches)

    async def events(
        self,
        services: Services,
        run_id: str,
        interval_s: float,
        gone: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[str]:
        """The events of run ``run_id`` (a full id), until it finished or the client is
        ``gone``."""
        watch = self._watches.get(run_id)
        if watch is None or watch.failure is not None:
            watch = RunWatch(services, run_id, interval_s)
            watch.start()
            self._watches[run_id] = watch
        watch.followers += 1
        try:
            async for event in watch.follow(gone):
                yield event
        finally:
            watch.followers -= 1
            if watch.followers == 0:
                watch.stop()
                if self._watches.get(run_id) is watch:
                    del self._watches[run_id]
