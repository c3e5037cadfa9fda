"""A run followed live over HTTP: server-sent events of its step changes and its end.

``GET /api/runs/{id}/events`` answers ``text/event-stream``: an ``event: step`` (a
``StepStatusChanged`` as JSON) for each step whose status or attempt changed, an ``event:
run`` (the run's record) once it finished, then the stream ends. The server reads its own
store at a modest interval (``poll_interval_s``); a stream that was cut is followed again
from the start: a reconnected client is sent every step that left ``pending`` once more
and drops what it has seen (a step, its status and its attempt say what it saw).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    StepRecord,
    StepStatus,
    StepStatusChanged,
)
from conveyor.service.context import Services
from conveyor.service.public_records import public_run

KEEPALIVE_S = 15.0
"""A comment line at least this often: proxies keep the stream, the server sees a client gone."""


def change_of(step: StepRecord) -> StepStatusChanged:
    """A step's record as the change that would have announced its status."""
    return StepStatusChanged(
        run_id=step.run_id,
        step=step.name,
        status=step.status,
        attempt=step.attempt,
        error=step.error,
        duration_s=step.duration_s,
        outputs=step.outputs,
        retry_at=step.retry_at,
        cached_from=step.cached_from,
    )


def _event(kind: str, data: str) -> str:
    # JSON holds no raw newline, so one data line each.
    return f"event: {kind}\ndata: {data}\n\n"


async def run_events(
    services: Services,
    run_id: str,
    interval_s: float,
    gone: Callable[[], Awaitable[bool]],
) -> AsyncIterator[str]:
    """The events of run ``run_id`` (a full id), until it finished or the client is ``gone``."""
    sent: dict[str, tuple[StepStatus, int]] = {}
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    yield "retry: 1000\n\n"
    while not await gone():
        # The run first: once it is finished, the steps read after it are final.
        run = await services.runs.get_run(run_id)
        for step in await services.runs.steps_of(run_id):
            seen = (step.status, step.attempt)
            previous = sent.get(step.name)
            if previous == seen or (
                # Pending from the start is no news; pending again after a failure is a retry.
                previous is None and step.status is StepStatus.PENDING and step.retry_at is None
            ):
                continue
            sent[step.name] = seen
            quiet_since = loop.time()
            yield _event("step", change_of(step).model_dump_json())
        if run.status in FINISHED_RUN_STATUSES:
            yield _event("run", public_run(run).model_dump_json())
            return
        if loop.time() - quiet_since >= KEEPALIVE_S:
            quiet_since = loop.time()
            yield ": keepalive\n\n"
        await asyncio.sleep(interval_s)
