"""The attempts of a step that were not its own failures (lost with their worker, or run
again on the recorded inputs) are kept with the step: a controller that reloads its states
from the store (after a failed batch, or at a restart) still charges none of them to the
step's retries, and still fails a step once its attempts were lost ``max_lost`` times.
The state machine, called directly, on a real SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from conveyor.contracts import PipelineSpec, RunStatus, StepStarted, StepStatus, new_id
from conveyor.service.run_state import RunState, Transition
from conveyor.service.scheduling import apply_event, expire_leases, renew_lease, start_run
from conveyor.service.store import Database, RunStore, Writes
from conveyor.service.store.migrations import MIGRATIONS
from tests.unit.test_chain_riders import link
from tests.unit.test_scheduling import BY, NOW, fail, node, ok, ready_steps, ref, spec

LEASE = timedelta(seconds=30)


class Rig:
    """One run recorded in a store, its transitions written as the controller writes them."""

    def __init__(self, db: Database, pipeline: PipelineSpec) -> None:
        self.db, self.runs = db, RunStore(db)
        self.run_id = new_id()
        self.pipeline = pipeline
        self.state = RunState.new(self.run_id, pipeline)

    async def record(self, change: Transition) -> Transition:
        writes = Writes()
        self.runs.apply(writes, self.run_id, change, NOW)
        await self.db.write(writes)
        return change

    async def start(self) -> None:
        writes = Writes()
        self.runs.insert_run(
            writes,
            run_id=self.run_id,
            spec=self.pipeline,
            stack_id=new_id(),
            stack_name="default",
            stack_snapshot={},
            idempotency_key=None,
            owner=None,
            now=NOW,
        )
        await self.db.write(writes)
        await self.record(start_run(self.state, NOW))

    async def lose(self, step: str, attempt: int, now: datetime) -> Transition:
        """``attempt`` of ``step`` starts, then its worker stops renewing its lease."""
        await self.record(apply_event(self.state, started(self.run_id, step, attempt)))
        renew_lease(self.state, step, attempt, now)
        return await self.record(expire_leases(self.state, now + LEASE, max_lost=3))

    async def reload(self) -> None:
        """As the controller after a failed batch, or at a restart."""
        self.state = await self.runs.load_state(self.run_id)


def started(run_id: str, step: str, attempt: int) -> StepStarted:
    return StepStarted(run_id=run_id, step=step, attempt=attempt, by=BY)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database(tmp_path / "conveyor.db") as database:
        yield database


async def test_an_attempt_lost_before_a_reload_uses_none_of_the_steps_retries(
    db: Database,
) -> None:
    rig = Rig(db, spec(node("a", retries=1)))
    await rig.start()
    assert ready_steps((await rig.lose("a", 1, NOW)).emit) == [("a", 2)]
    await rig.reload()
    out = await rig.record(apply_event(rig.state, fail(rig.state, "a", attempt=2)))
    assert ready_steps(out.emit) == [("a", 3)], "its one retry: attempt 1 was lost, not failed"
    await rig.reload()
    assert rig.state.steps["a"].status is StepStatus.PENDING
    assert rig.state.steps["a"].attempt == 3


async def test_a_step_whose_attempts_are_lost_across_reloads_fails_after_max_lost(
    db: Database,
) -> None:
    rig = Rig(db, spec(node("a"), node("b", "a")))
    await rig.start()
    now = NOW
    for attempt in (1, 2):
        assert ready_steps((await rig.lose("a", attempt, now)).emit) == [("a", attempt + 1)]
        await rig.reload()
        now += 2 * LEASE
    out = await rig.lose("a", 3, now)
    assert ready_steps(out.emit) == [], "a third attempt lost: no fourth"
    assert "its attempts were lost 3 times" in (out.steps[0].error or "")
    await rig.reload()
    assert rig.state.status is RunStatus.FAILED
    assert rig.state.steps["a"].status is StepStatus.FAILED
    assert rig.state.steps["b"].status is StepStatus.SKIPPED


async def test_a_rider_run_again_before_a_reload_keeps_its_retries(db: Database) -> None:
    rig = Rig(db, spec(link("s0"), link("s1", "s0", retries=1)))
    await rig.start()
    await rig.record(apply_event(rig.state, ok(rig.state, "s0")))
    other = {"rode_on": {"output": ref("another execution of s0").digest}}
    stale = ok(rig.state, "s1").model_copy(update=other)
    assert ready_steps((await rig.record(apply_event(rig.state, stale))).emit) == [("s1", 2)]
    await rig.reload()
    out = await rig.record(apply_event(rig.state, fail(rig.state, "s1", attempt=2)))
    assert ready_steps(out.emit) == [("s1", 3)], "its one retry: attempt 1 was run again"


async def test_the_counts_leave_the_stored_ones_as_they_are_when_unchanged(
    db: Database,
) -> None:
    # Attempt 1 lost; attempt 2 starts, then fails: rows written after the loss (the
    # step running, then waiting for its retry) leave what was counted as it was.
    rig = Rig(db, spec(node("a", retries=2)))
    await rig.start()
    await rig.lose("a", 1, NOW)
    await rig.reload()
    await rig.record(apply_event(rig.state, started(rig.run_id, "a", 2)))
    await rig.record(apply_event(rig.state, fail(rig.state, "a", attempt=2)))
    await rig.reload()
    assert (rig.state.steps["a"].lost, rig.state.steps["a"].redone) == (1, 0)
    out = await rig.record(apply_event(rig.state, fail(rig.state, "a", attempt=3)))
    assert ready_steps(out.emit) == [("a", 4)], "two failures of its own: its second retry"


async def test_a_step_recorded_before_the_counts_were_kept_counts_none(tmp_path: Path) -> None:
    # A store at migration 12 whose run has step ``a`` running its second attempt.
    path, run_id = tmp_path / "conveyor.db", new_id()
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:12]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 12")
    conn.execute(
        "INSERT INTO runs (id, pipeline, stack_id, stack_name, stack_snapshot, status,"
        " parameters, spec, created) VALUES (?, 'p', 's', 'default', '{}', 'running', '{}',"
        " ?, ?)",
        (run_id, spec(node("a", retries=1)).model_dump_json(), NOW.isoformat()),
    )
    conn.execute(
        "INSERT INTO steps (run_id, name, position, status, attempt, max_retries)"
        " VALUES (?, 'a', 0, 'running', 2, 1)",
        (run_id,),
    )
    conn.commit()
    conn.close()
    async with Database(path) as db:
        state = await RunStore(db).load_state(run_id)
    a = state.steps["a"]
    assert (a.status, a.attempt, a.lost, a.redone) == (StepStatus.RUNNING, 2, 0, 0)
