"""The step pools a stack's runs used, kept by the store for the checks that ask the broker
about a stack's queues: recorded with each run, and found in the runs of a store that was
made before they were kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conveyor.contracts import PipelineSpec, StepSpec, new_id, utcnow
from conveyor.service.store import Database, RunStore, StackStore, Writes
from conveyor.service.store.migrations import MIGRATIONS

STACK_ID, OTHER_ID = new_id(), new_id()


def spec(*pools: str) -> PipelineSpec:
    steps = [StepSpec(name=f"s{i}", ref="m.py:f", pool=pool) for i, pool in enumerate(pools)]
    return PipelineSpec(name="p", steps=steps)


def store_before_pools_were_kept(path: Path) -> None:
    """A store at migration 11 holding three runs (one of them on another stack)."""
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:11]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 11")
    for stack_id, pools in ((STACK_ID, ("default", "gpu")), (STACK_ID, ("gpu", "tpu"))):
        conn.execute(
            "INSERT INTO runs (id, pipeline, stack_id, stack_name, stack_snapshot, status,"
            " parameters, spec, created) VALUES (?, 'p', ?, 'prod', '{}', 'completed', '{}',"
            " ?, ?)",
            (new_id(), stack_id, spec(*pools).model_dump_json(), utcnow().isoformat()),
        )
    conn.execute(
        "INSERT INTO runs (id, pipeline, stack_id, stack_name, stack_snapshot, status,"
        " parameters, spec, created) VALUES (?, 'p', ?, 'lab', '{}', 'failed', '{}', ?, ?)",
        (new_id(), OTHER_ID, spec("cpu").model_dump_json(), utcnow().isoformat()),
    )
    conn.commit()
    conn.close()


async def test_the_pools_of_runs_recorded_before_they_were_kept_are_found(
    tmp_path: Path,
) -> None:
    path = tmp_path / "conveyor.db"
    store_before_pools_were_kept(path)
    async with Database(path) as db:
        stacks = StackStore(db)
        assert await stacks.pools_used(STACK_ID, 10) == ["default", "gpu", "tpu"]
        assert await stacks.pools_used(OTHER_ID, 10) == ["cpu"]
        assert await stacks.pools_used(new_id(), 10) == []


async def test_a_recorded_run_adds_its_pools_once_and_a_read_is_bounded(tmp_path: Path) -> None:
    async with Database(tmp_path / "conveyor.db") as db:
        runs, stacks = RunStore(db), StackStore(db)
        for pools in (("default", "gpu", "gpu"), ("gpu", "arm"), ("default",)):
            writes = Writes()
            runs.insert_run(
                writes,
                run_id=new_id(),
                spec=spec(*pools),
                stack_id=STACK_ID,
                stack_name="prod",
                stack_snapshot={},
                idempotency_key=None,
                owner=None,
                now=utcnow(),
            )
            await db.write(writes)
        assert await stacks.pools_used(STACK_ID, 10) == ["arm", "default", "gpu"]
        assert await stacks.pools_used(STACK_ID, 2) == ["arm", "default"]
        assert await stacks.pools_used(OTHER_ID, 10) == []
