"""The runs embedded controllers own, by their process: those going (who may cancel them;
failed when their process died) and those queued (ended, never started, when their process
stopped or died)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from conveyor.contracts import RunStatus, StepStatus, utcnow
from conveyor.service.store.db import Database
from conveyor.service.store.runs import ACTIVE, BUMP_MARKER


def _unrun(status: RunStatus) -> StepStatus:
    """What a step that never ran becomes when its run ends ``status``."""
    return StepStatus.SKIPPED if status is RunStatus.FAILED else StepStatus.CANCELLED


class OwnedRuns:
    """The runs and the queued requests that embedded controllers own, with their owners."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def active(self, host: str) -> list[tuple[str, int, str]]:
        """The unfinished runs of embedded controllers of ``host``: id, pid and token."""
        rows = await self.db.fetchall(
            "SELECT id, owner_pid, owner_token FROM runs WHERE owner_host = ? AND status IN (?, ?)",
            (host, *ACTIVE),
        )
        return [(row["id"], row["owner_pid"], row["owner_token"]) for row in rows]

    async def queued(self, host: str) -> list[tuple[str, int, str]]:
        """The requests queued by embedded controllers of ``host``: id, pid and token."""
        rows = await self.db.fetchall(
            "SELECT id, owner_pid, owner_token FROM run_requests WHERE owner_host = ?", (host,)
        )
        return [(row["id"], row["owner_pid"], row["owner_token"]) for row in rows]

    async def end_queued(self, run_ids: Sequence[str], status: RunStatus, reason: str) -> list[str]:
        """Record runs that were queued and never started as ended, ``status`` (cancelled or
        failed) for ``reason``, in place of their requests: listed and described as any
        run, with their steps cancelled (or skipped, for a failed run), none of them run.
        The ones whose requests a controller took meanwhile are left to it; the others'
        ids are returned. They ran on no stack: their snapshot is empty, as a queued
        run's."""
        step_status = _unrun(status)
        now = utcnow().isoformat()
        ended: list[str] = []
        async with self.db.transaction() as conn:
            for run_id in run_ids:
                cursor = await conn.execute(
                    "SELECT pipeline, stack_id, stack_name, parameters, spec, created,"
                    " idempotency_key, owner_host, owner_pid, owner_token FROM run_requests"
                    " WHERE id = ? AND id NOT IN (SELECT id FROM runs)",
                    (run_id,),
                )
                row = await cursor.fetchone()
                if row is None:
                    continue
                await conn.execute(
                    "INSERT INTO runs (id, pipeline, stack_id, stack_name, stack_snapshot,"
                    " status, parameters, spec, created, finished, error, idempotency_key,"
                    " owner_host, owner_pid, owner_token)"
                    " VALUES (?, ?, ?, ?, '{}', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        row["pipeline"],
                        row["stack_id"],
                        row["stack_name"],
                        status.value,
                        row["parameters"],
                        row["spec"],
                        row["created"],
                        now,
                        reason,
                        row["idempotency_key"],
                        row["owner_host"],
                        row["owner_pid"],
                        row["owner_token"],
                    ),
                )
                await conn.execute(BUMP_MARKER, (run_id,))
                # Only the names and retries of its steps: the spec as recorded, not parsed.
                steps = json.loads(row["spec"]).get("steps", [])
                await conn.executemany(
                    "INSERT INTO steps (run_id, name, position, status, max_retries, finished,"
                    " error, changed) VALUES (?, ?, ?, ?, ?, ?, ?,"
                    " (SELECT marker FROM run_changes WHERE run_id = ?))",
                    [
                        (
                            run_id,
                            step["name"],
                            position,
                            step_status.value,
                            step.get("retries", 0),
                            now,
                            reason,
                            run_id,
                        )
                        for position, step in enumerate(steps)
                    ],
                )
                await conn.execute("DELETE FROM run_requests WHERE id = ?", (run_id,))
                ended.append(run_id)
        return ended

    async def end_unfinished(
        self, run_ids: Sequence[str], status: RunStatus, reason: str
    ) -> list[str]:
        """End the unfinished runs of ``run_ids``, ``status`` (failed: their process died;
        cancelled: their stack stopped) for ``reason``, with their unfinished steps: a
        running one failed or cancelled, a pending one skipped or cancelled. The ids of
        the runs ended are returned (one that finished meanwhile is left as it is)."""
        running = StepStatus.FAILED if status is RunStatus.FAILED else StepStatus.CANCELLED
        pending = _unrun(status)
        now = utcnow().isoformat()
        ended: list[str] = []
        async with self.db.transaction() as conn:
            for run_id in run_ids:
                cursor = await conn.execute(
                    "UPDATE runs SET status = ?, finished = ?, error = ? WHERE id = ? AND status"
                    " IN (?, ?)",
                    (status.value, now, reason, run_id, *ACTIVE),
                )
                if not cursor.rowcount:
                    continue
                await conn.execute(BUMP_MARKER, (run_id,))
                await conn.execute(
                    "UPDATE steps SET changed = (SELECT marker FROM run_changes WHERE run_id = ?),"
                    " status = CASE status WHEN ? THEN ? ELSE ? END,"
                    " finished = ?, error = ? WHERE run_id = ? AND status IN (?, ?)",
                    (
                        run_id,
                        StepStatus.RUNNING.value,
                        running.value,
                        pending.value,
                        now,
                        reason,
                        run_id,
                        StepStatus.RUNNING.value,
                        StepStatus.PENDING.value,
                    ),
                )
                ended.append(run_id)
        return ended
