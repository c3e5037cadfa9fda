"""Runs that were queued and never started, recorded as ended in place of their requests
(``OwnedRuns.end_queued``): when their embedded stack stops, or the process that queued them
died. On a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.contracts import RunRequested, RunStatus, StackSpec, StepStatus, new_id
from conveyor.service.store import Database, OwnedRuns, RunRequests, RunStore, Writes
from tests.unit.test_scheduling import NOW, node, spec

STACK = StackSpec(id="s1", name="default", components={})
OWNER = ("host", 4242, "token")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database(tmp_path / "conveyor.db") as database:
        yield database


async def queue(db: Database, key: str | None = None) -> str:
    """A run an embedded controller queued: its request only."""
    request = RunRequested(
        run_id=new_id(),
        pipeline="p",
        spec=spec(node("a", retries=2), node("b", "a")),
        idempotency_key=key,
    )
    writes = Writes()
    RunRequests(db).record_queued(writes, request, STACK, OWNER, NOW)
    await db.write(writes)
    return request.run_id


async def test_a_queued_run_ends_as_a_run_that_never_started(db: Database) -> None:
    runs = RunStore(db)
    run_id = await queue(db, key="nightly-1")
    assert (await runs.get_run(run_id)).status is RunStatus.QUEUED
    reason = "its stack stopped before the run started"
    assert await OwnedRuns(db).end_queued([run_id], RunStatus.CANCELLED, reason) == [run_id]

    record = await runs.get_run(run_id)
    assert (record.status, record.error, record.started) == (RunStatus.CANCELLED, reason, None)
    assert record.pipeline == "p" and record.stack_name == "default"
    steps = await runs.steps_of(run_id)
    assert [(s.name, s.status, s.attempt, s.max_retries) for s in steps] == [
        ("a", StepStatus.CANCELLED, 0, 2),
        ("b", StepStatus.CANCELLED, 0, 0),
    ]
    assert [r.id for r in await runs.list_runs()] == [run_id]  # once, and not queued
    assert (await runs.find_seen_by_key("nightly-1")) is not None
    assert not await RunRequests(db).is_requested(run_id)
    # Done once.
    assert await OwnedRuns(db).end_queued([run_id], RunStatus.FAILED, "again") == []
    assert (await runs.get_run(run_id)).status is RunStatus.CANCELLED


async def test_a_failed_queued_runs_steps_are_skipped(db: Database) -> None:
    runs = RunStore(db)
    run_id = await queue(db)
    assert await OwnedRuns(db).end_queued([run_id], RunStatus.FAILED, "its process died")
    assert (await runs.get_run(run_id)).status is RunStatus.FAILED
    assert {s.status for s in await runs.steps_of(run_id)} == {StepStatus.SKIPPED}


async def test_a_run_its_controller_took_meanwhile_is_left_to_it(db: Database) -> None:
    runs = RunStore(db)
    taken, queued = await queue(db), await queue(db)
    writes = Writes()
    runs.insert_run(
        writes,
        run_id=taken,
        spec=spec(node("a")),
        stack_id=STACK.id,
        stack_name=STACK.name,
        stack_snapshot={},
        idempotency_key=None,
        owner=OWNER,
        now=NOW,
    )
    await db.write(writes)
    ended = await OwnedRuns(db).end_queued([taken, queued], RunStatus.CANCELLED, "stopped")
    assert ended == [queued]
    assert (await runs.get_run(taken)).status is RunStatus.PENDING
