"""Following a run through the server (``GET /api/runs/{id}/events``): one reader per run
shared by its followers, reading only the steps that changed since it last looked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from conveyor.contracts import (
    ArtifactRef,
    NotFoundError,
    PipelineSpec,
    RunStatus,
    StepSpec,
    StepStatus,
    new_id,
    utcnow,
)
from conveyor.service.context import Services
from conveyor.service.run_state import StepUpdate, Transition
from conveyor.service.store.db import Writes
from tests.integration.api_helpers import serving
from tests.store_support import record_run

FAN_OUT = 3000


async def _apply(
    services: Services,
    run_id: str,
    steps: list[StepUpdate],
    run_status: RunStatus | None = None,
    chunk: int = 500,
) -> None:
    """``steps`` recorded in transactions of ``chunk`` steps (the run's status with the last)."""
    for start in range(0, len(steps), chunk):
        last = start + chunk >= len(steps)
        writes = Writes()
        change = Transition(steps[start : start + chunk], run_status if last else None)
        services.runs.apply(writes, run_id, change, utcnow())
        await services.db.write(writes)


class _Follower:
    """A client of ``RunWatches.events``: the steps' (name, status, attempt) it was sent."""

    def __init__(self, app: FastAPI, services: Services, run_id: str) -> None:
        self.steps: list[tuple[str, str, int]] = []
        self.outputs: dict[str, dict[str, Any]] = {}
        self.run: dict[str, Any] | None = None
        self.left = asyncio.Event()
        events = app.state.conveyor.watches.events(services, run_id, 0.05, self._gone)
        self.task = asyncio.create_task(self._read(events))

    async def _gone(self) -> bool:
        return self.left.is_set()

    async def _read(self, events: AsyncIterator[str]) -> None:
        async for event in events:
            if event.startswith("event: step"):
                change = json.loads(event.split("data: ", 1)[1])
                self.steps.append((change["step"], change["status"], change["attempt"]))
                if change["outputs"]:
                    self.outputs[change["step"]] = change["outputs"]
            elif event.startswith("event: run"):
                self.run = json.loads(event.split("data: ", 1)[1])

    async def received(self, count: int) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while len(self.steps) < count:
            assert asyncio.get_running_loop().time() < deadline, f"{len(self.steps)} of {count}"
            await asyncio.sleep(0.02)


def _reads_of(services: Services, run_id: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL of each read of the store that names ``run_id``, from now on."""
    asked: list[str] = []
    for name in ("fetchall", "fetchone"):
        real = getattr(services.db, name)

        def spy(sql: str, params: Any = (), real: Any = real) -> Any:
            if run_id in params:
                asked.append(sql)
            return real(sql, params)

        monkeypatch.setattr(services.db, name, spy)
    return asked


async def test_followers_of_a_large_run_share_one_reader_that_reads_only_what_changed(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(home) as (app, _):
        services = app.state.conveyor.services
        run_id = await record_run(services, FAN_OUT)
        asked = _reads_of(services, run_id, monkeypatch)
        first, second = _Follower(app, services, run_id), _Follower(app, services, run_id)
        names = [f"s{i}" for i in range(FAN_OUT)]
        output = ArtifactRef(
            uri="file:///x/ab/cd",
            digest="blake3:" + "a" * 64,
            size=1,
            materializer="json",
            data_type="builtins.int",
        )
        await _apply(
            services,
            run_id,
            [StepUpdate(n, StepStatus.RUNNING, 1) for n in names],
            RunStatus.RUNNING,
        )
        for follower in (first, second):
            await follower.received(FAN_OUT)
        assert len(app.state.conveyor.watches) == 1, "one reader for both followers"
        # Nothing changes: each poll reads the run's marker, and no step and no output.
        asked.clear()
        await asyncio.sleep(0.5)
        assert asked, "the run is still polled"
        assert all("steps" not in sql and "artifacts" not in sql for sql in asked), asked
        assert len(asked) <= 2 * (0.5 / 0.05 + 2), "one poll serves both followers"
        # Half complete (with an output each); one fails and waits for its retry.
        await _apply(
            services,
            run_id,
            [
                StepUpdate(n, StepStatus.COMPLETED, 1, outputs={"out": output})
                for n in names[: FAN_OUT // 2]
            ]
            + [StepUpdate("s2999", StepStatus.PENDING, 1, retry_at=utcnow(), error="boom")],
        )
        for follower in (first, second):
            await follower.received(FAN_OUT + FAN_OUT // 2 + 1)
        # A follower that comes now (a stream taken up again) is sent each step's state once.
        late = _Follower(app, services, run_id)
        await late.received(FAN_OUT)
        await asyncio.sleep(0.2)
        assert len(late.steps) == FAN_OUT
        # A small change reads only the steps it changed.
        asked.clear()
        await _apply(services, run_id, [StepUpdate("s2999", StepStatus.RUNNING, 2)])
        for follower in (first, second):
            await follower.received(FAN_OUT + FAN_OUT // 2 + 2)
        step_reads = [sql for sql in asked if "FROM steps" in sql]
        assert step_reads and all("changed >" in sql for sql in step_reads), step_reads
        await _apply(
            services,
            run_id,
            [StepUpdate(n, StepStatus.COMPLETED, 1) for n in names[FAN_OUT // 2 : -1]]
            + [StepUpdate("s2999", StepStatus.COMPLETED, 2)],
            RunStatus.COMPLETED,
        )
        for follower in (first, second, late):
            await asyncio.wait_for(follower.task, 30)
            assert follower.run is not None and follower.run["status"] == "completed"
            assert len(follower.steps) == len(set(follower.steps)), "each change sent once"
            final = {name: (status, attempt) for name, status, attempt in follower.steps}
            assert final == {n: ("completed", 2 if n == "s2999" else 1) for n in names}
            assert set(follower.outputs) == set(names[: FAN_OUT // 2])
        expected = (
            {(n, "running", 1) for n in names}
            | {(n, "completed", 1) for n in names[:-1]}
            | {("s2999", "pending", 1), ("s2999", "running", 2), ("s2999", "completed", 2)}
        )
        for follower in (first, second):
            assert set(follower.steps) == expected
        assert len(app.state.conveyor.watches) == 0, "a watch ends with its last follower"


async def test_a_follower_that_leaves_ends_the_watch_of_its_run(home: Path) -> None:
    async with serving(home) as (app, _):
        services = app.state.conveyor.services
        run_id = await record_run(services, 3)
        await _apply(services, run_id, [StepUpdate("s0", StepStatus.RUNNING, 1)])
        follower = _Follower(app, services, run_id)
        await follower.received(1)
        assert follower.steps == [("s0", "running", 1)]
        follower.left.set()
        await asyncio.wait_for(follower.task, 5)
        assert follower.run is None and len(app.state.conveyor.watches) == 0


async def test_a_queued_run_is_polled_by_small_rows_and_followed_once_recorded(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(home) as (app, _):
        services = app.state.conveyor.services
        stack = await services.stacks.get("default")
        run_id = new_id()
        steps = [StepSpec(name=f"s{i}", ref="m:f") for i in range(FAN_OUT)]
        # Requested of a controller that is not there yet: queued, no step rows.
        await services.run_requests.record(
            run_id, PipelineSpec(name="fan", steps=steps), stack, None, utcnow()
        )
        asked = _reads_of(services, run_id, monkeypatch)
        follower = _Follower(app, services, run_id)
        await asyncio.sleep(0.5)
        assert asked, "the queued run is polled"
        # Each poll: the run's marker (there is none) and whether it is still requested;
        # never the request in full (its spec names every step).
        small = ("FROM runs r LEFT JOIN run_changes c", "SELECT 1 AS found FROM run_requests")
        assert all(any(part in sql for part in small) for sql in asked), set(asked)
        assert follower.steps == [] and follower.run is None and not follower.task.done()
        # A controller records it, and runs it: the stream goes on as for any run.
        await record_run(services, FAN_OUT, run_id)
        names = [s.name for s in steps]
        await _apply(
            services,
            run_id,
            [StepUpdate(n, StepStatus.RUNNING, 1) for n in names],
            RunStatus.RUNNING,
        )
        await follower.received(FAN_OUT)
        await _apply(
            services,
            run_id,
            [StepUpdate(n, StepStatus.COMPLETED, 1) for n in names],
            RunStatus.COMPLETED,
        )
        await asyncio.wait_for(follower.task, 30)
        assert follower.steps == [(n, "running", 1) for n in names] + [
            (n, "completed", 1) for n in names
        ]
        assert follower.run is not None and follower.run["status"] == "completed"

        # A request withdrawn before any controller recorded it ends its stream: not found.
        withdrawn = new_id()
        await services.run_requests.record(
            withdrawn, PipelineSpec(name="fan", steps=steps[:2]), stack, None, utcnow()
        )
        gone = _Follower(app, services, withdrawn)
        await asyncio.sleep(0.2)
        assert not gone.task.done()
        await services.run_requests.forget(withdrawn)
        with pytest.raises(NotFoundError, match="no run"):
            await asyncio.wait_for(gone.task, 5)
        assert gone.steps == [] and gone.run is None
