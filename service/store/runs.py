"""Runs, their steps and outputs in the metadata store."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiosqlite

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ArtifactRef,
    ConflictError,
    NotFoundError,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    new_id,
)
from conveyor.contracts.errors import shown
from conveyor.service.run_state import RunState, Transition
from conveyor.service.store.artifacts import artifact_ref
from conveyor.service.store.db import MAX_QUERY_KEYS, Database, Writes
from conveyor.service.store.id_prefixes import (
    SHOWN_CANDIDATES,
    Candidate,
    check_typed_id,
    could_match,
    pick_id,
)

# The events and the pipeline spec are imported by the methods that read them: importing
# them builds their models, which listing runs and stacks (the CLI) never uses.
if TYPE_CHECKING:
    from conveyor.contracts import PipelineSpec, StepStatusChanged

ACTIVE = (RunStatus.PENDING.value, RunStatus.RUNNING.value)
BUMP_MARKER = (
    "INSERT INTO run_changes (run_id, marker) VALUES (?, 1)"
    " ON CONFLICT (run_id) DO UPDATE SET marker = marker + 1"
)
"""Move a run's change marker on (in the transaction that changes its steps)."""


def _ts(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _run_record(row: aiosqlite.Row) -> RunRecord:
    created = _dt(row["created"])
    assert created is not None
    return RunRecord(
        id=row["id"],
        pipeline=row["pipeline"],
        stack_id=row["stack_id"],
        stack_name=row["stack_name"],
        stack_snapshot=json.loads(row["stack_snapshot"]),
        status=RunStatus(row["status"]),
        parameters=json.loads(row["parameters"]),
        created=created,
        started=_dt(row["started"]),
        finished=_dt(row["finished"]),
        error=row["error"],
        idempotency_key=row["idempotency_key"],
        retry_of=row["retry_of"],
        # A Row's ``in`` looks at its values; the runs table (not the view) has no column.
        retried_by=_ids(row["retried_by"]) if "retried_by" in row.keys() else [],  # noqa: SIM118
        # Only the view knows who submitted a run; the controller reads ``runs`` alone.
        # (``in row`` would look among a Row's values, not its column names.)
        user=row["submitted_by"] if "submitted_by" in row.keys() else "default",  # noqa: SIM118
    )


def _ids(joined: str | None) -> list[str]:
    return sorted(joined.split(",")) if joined else []


SEEN = "runs_and_requests"
"""What people see: the recorded runs, and the runs this client requested that no controller
has recorded yet (queued: the requests ``RunRequests`` keeps). The controller reads ``runs``
alone."""


def check_deletable(run: RunRecord) -> None:
    """Only a finished run may be deleted: a live one still has steps that write to it."""
    if run.status not in FINISHED_RUN_STATUSES:
        raise ConflictError(f"run {run.id} is {run.status}; cancel it before deleting it")


class RunStore:
    """Reads and writes of run state.

    The controller's writes are gathered into a :class:`Writes` and run by ``Database.write``
    as one transaction.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- writes (the controller's) ---

    def insert_run(
        self,
        writes: Writes,
        *,
        run_id: str,
        spec: PipelineSpec,
        stack_id: str,
        stack_name: str,
        stack_snapshot: dict[str, Any],
        idempotency_key: str | None,
        owner: tuple[str, int, str] | None,
        now: datetime,
        retry_of: str | None = None,
    ) -> None:
        host, pid, token = owner if owner else (None, None, None)
        writes.add(
            "INSERT INTO runs (id, pipeline, stack_id, stack_name, stack_snapshot, status,"
            " parameters, spec, created, idempotency_key, owner_host, owner_pid, owner_token,"
            " retry_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    spec.name,
                    stack_id,
                    stack_name,
                    json.dumps(stack_snapshot),
                    RunStatus.PENDING.value,
                    json.dumps(spec.parameters),
                    spec.model_dump_json(),
                    now.isoformat(),
                    idempotency_key,
                    host,
                    pid,
                    token,
                    retry_of,
                )
            ],
        )
        writes.add(
            "INSERT OR IGNORE INTO stack_pools (stack_id, pool) VALUES (?, ?)",
            [(stack_id, pool) for pool in sorted({s.pool for s in spec.steps})],
        )
        writes.add(
            "INSERT INTO steps (run_id, name, position, status, max_retries) VALUES (?,?,?,?,?)",
            [
                (run_id, s.name, i, StepStatus.PENDING.value, s.retries)
                for i, s in enumerate(spec.steps)
            ],
        )

    def apply(self, writes: Writes, run_id: str, change: Transition, now: datetime) -> None:
        """Persist a transition of ``run_id``: step rows, artifacts and the run's status."""
        if change.steps:
            # The run's change marker moves, and each changed step records it: a follower
            # reads only the steps changed since the marker it saw (``step_changes``).
            writes.add(BUMP_MARKER, [(run_id,)])
        writes.add(
            "UPDATE steps SET changed = (SELECT marker FROM run_changes WHERE run_id = ?),"
            " status = ?, attempt = ?, started = COALESCE(?, started),"
            " finished = ?, duration_s = COALESCE(?, duration_s), error = ?,"
            " traceback = ?, pid = COALESCE(?, pid), worker = COALESCE(?, worker),"
            " logs = COALESCE(?, logs), retry_at = ?, cache_key = COALESCE(?, cache_key),"
            " cached_from = COALESCE(?, cached_from), lost = COALESCE(?, lost),"
            " redone = COALESCE(?, redone) WHERE run_id = ? AND name = ?",
            (
                (
                    run_id,
                    u.status.value,
                    u.attempt,
                    _ts(u.started),
                    _ts(u.finished),
                    u.duration_s,
                    u.error,
                    u.traceback,
                    u.pid,
                    u.worker,
                    u.logs.model_dump_json() if u.logs else None,
                    _ts(u.retry_at),
                    u.cache_key,
                    u.cached_from,
                    u.lost,
                    u.redone,
                    run_id,
                    u.name,
                )
                for u in change.steps
            ),
        )
        writes.add(
            "INSERT OR IGNORE INTO artifacts (id, run_id, step_name, output_name, uri, digest,"
            " size, materializer, materializer_version, data_type, created)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                (
                    new_id(),
                    run_id,
                    u.name,
                    output,
                    r.uri,
                    r.digest,
                    r.size,
                    r.materializer,
                    r.materializer_version,
                    r.data_type,
                    now.isoformat(),
                )
                for u in change.steps
                for output, r in u.outputs.items()
            ),
        )
        if change.run_status is RunStatus.RUNNING:
            writes.add(
                "UPDATE runs SET status = ?, started = COALESCE(started, ?) WHERE id = ?",
                [(RunStatus.RUNNING.value, now.isoformat(), run_id)],
            )
        elif change.run_status is not None:
            writes.add(
                "UPDATE runs SET status = ?, finished = ?, error = ?,"
                " started = COALESCE(started, ?) WHERE id = ?",
                [
                    (
                        change.run_status.value,
                        now.isoformat(),
                        change.run_error,
                        now.isoformat(),
                        run_id,
                    )
                ],
            )

    # --- reads ---

    async def run_by_id(self, run_id: str) -> RunRecord:
        """The run of exactly this id (what the controller looks up: never a prefix)."""
        row = await self.db.fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise NotFoundError(f"no run with id {shown(run_id)}")
        return _run_record(row)

    async def recorded(self, run_ids: Sequence[str]) -> set[str]:
        """Which of ``run_ids`` the store holds runs of (one query per 500 ids)."""
        found: set[str] = set()
        for start in range(0, len(run_ids), MAX_QUERY_KEYS):
            chunk = list(run_ids[start : start + MAX_QUERY_KEYS])
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(f"SELECT id FROM runs WHERE id IN ({marks})", chunk)
            found.update(row["id"] for row in rows)
        return found

    async def get_run(self, run_id: str) -> RunRecord:
        """The run of this id, or of the one id that starts with it (for people)."""
        check_typed_id("run", run_id)
        row = await self.db.fetchone(f"SELECT * FROM {SEEN} WHERE id = ?", (run_id,))
        if row is None:
            full_id = pick_id("run", run_id, await self._run_candidates(run_id))
            row = await self.db.fetchone(f"SELECT * FROM {SEEN} WHERE id = ?", (full_id,))
        if row is None:  # deleted in between
            raise NotFoundError(f"no run with id {shown(run_id)}")
        return _run_record(row)

    async def _run_candidates(self, typed: str) -> list[Candidate]:
        if not could_match(typed):
            return []
        rows = await self.db.fetchall(
            f"SELECT id, pipeline, created FROM {SEEN} WHERE substr(id, 1, ?) = ?"
            " ORDER BY created DESC LIMIT ?",
            (len(typed), typed, SHOWN_CANDIDATES + 1),
        )
        return [Candidate(r["id"], f"pipeline {r['pipeline']}, {r['created'][:19]}") for r in rows]

    async def find_by_key(self, idempotency_key: str) -> RunRecord | None:
        """The recorded run of ``idempotency_key`` (what the controller checks)."""
        row = await self.db.fetchone(
            "SELECT * FROM runs WHERE idempotency_key = ?", (idempotency_key,)
        )
        return _run_record(row) if row else None

    async def find_seen_by_key(self, idempotency_key: str) -> RunRecord | None:
        """The run of ``idempotency_key`` as clients see it: recorded, or queued (a request
        no controller has started yet), the first requested."""
        row = await self.db.fetchone(
            f"SELECT * FROM {SEEN} WHERE idempotency_key = ? ORDER BY created LIMIT 1",
            (idempotency_key,),
        )
        return _run_record(row) if row else None

    async def list_runs(
        self,
        *,
        stack_id: str | None = None,
        pipeline: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
        offset: int = 0,
        stack_name: str | None = None,
        user: str | None = None,
    ) -> list[RunRecord]:
        where, params = [], []
        filters = (
            ("stack_id", stack_id),
            ("stack_name", stack_name),
            ("pipeline", pipeline),
            ("status", status),
            ("submitted_by", user),
        )
        for column, value in filters:
            if value is not None:
                where.append(f"{column} = ?")
                params.append(str(value))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self.db.fetchall(
            f"SELECT * FROM {SEEN} {clause} ORDER BY created DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_run_record(row) for row in rows]

    async def spec_of(self, run_id: str) -> PipelineSpec:
        from conveyor.contracts import PipelineSpec

        row = await self.db.fetchone(f"SELECT spec FROM {SEEN} WHERE id = ?", (run_id,))
        if row is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return PipelineSpec.model_validate_json(row["spec"])

    async def outputs_of(self, run_id: str) -> dict[str, dict[str, ArtifactRef]]:
        rows = await self.db.fetchall("SELECT * FROM artifacts WHERE run_id = ?", (run_id,))
        found: dict[str, dict[str, ArtifactRef]] = {}
        for row in rows:
            found.setdefault(row["step_name"], {})[row["output_name"]] = artifact_ref(row)
        return found

    async def steps_of(self, run_id: str) -> list[StepRecord]:
        spec = await self.spec_of(run_id)
        upstream = {s.name: s.upstream for s in spec.steps}
        outputs = await self.outputs_of(run_id)
        rows = await self.db.fetchall(
            "SELECT * FROM steps WHERE run_id = ? ORDER BY position", (run_id,)
        )
        if not rows:  # a queued run: its steps as its spec names them, none started
            return [
                StepRecord(
                    run_id=run_id,
                    name=s.name,
                    status=StepStatus.PENDING,
                    max_retries=s.retries,
                    upstream=s.upstream,
                )
                for s in spec.steps
            ]
        return [
            StepRecord(
                run_id=run_id,
                name=row["name"],
                status=StepStatus(row["status"]),
                attempt=row["attempt"],
                max_retries=row["max_retries"],
                started=_dt(row["started"]),
                finished=_dt(row["finished"]),
                duration_s=row["duration_s"],
                error=row["error"],
                traceback=row["traceback"],
                pid=row["pid"],
                worker=row["worker"],
                upstream=upstream.get(row["name"], []),
                outputs=outputs.get(row["name"], {}),
                logs=ArtifactRef.model_validate_json(row["logs"]) if row["logs"] else None,
                retry_at=_dt(row["retry_at"]),
                cached_from=row["cached_from"],
            )
            for row in rows
        ]

    async def change_marker(self, run_id: str) -> tuple[RunStatus, int] | None:
        """A recorded run's status and change marker (``None``: not recorded, or deleted).

        One small row: neither a step nor the run's spec is read."""
        row = await self.db.fetchone(
            "SELECT r.status, COALESCE(c.marker, 0) AS marker FROM runs r"
            " LEFT JOIN run_changes c ON c.run_id = r.id WHERE r.id = ?",
            (run_id,),
        )
        return None if row is None else (RunStatus(row["status"]), row["marker"])

    async def step_changes(
        self, run_id: str, since: int | None
    ) -> tuple[list[StepStatusChanged], int]:
        """Each step of ``run_id`` whose record changed after marker ``since`` (every step
        with ``None``), as the change that would have announced its status, in the order of
        the run's steps; and the highest marker among them (0 if none)."""
        from conveyor.contracts import StepStatusChanged

        columns = "name, status, attempt, error, duration_s, retry_at, cached_from, changed"
        rows = await self.db.fetchall(  # markers start at 0: every step changed after -1
            f"SELECT {columns} FROM steps WHERE run_id = ? AND changed > ? ORDER BY position",
            (run_id, -1 if since is None else since),
        )
        with_outputs = [
            row["name"]
            for row in rows
            if row["status"] in (StepStatus.COMPLETED.value, StepStatus.CACHED.value)
        ]
        outputs = await self._outputs_of_steps(run_id, with_outputs)
        changes = [
            StepStatusChanged(
                run_id=run_id,
                step=row["name"],
                status=StepStatus(row["status"]),
                attempt=row["attempt"],
                error=row["error"],
                duration_s=row["duration_s"],
                outputs=outputs.get(row["name"], {}),
                retry_at=_dt(row["retry_at"]),
                cached_from=row["cached_from"],
            )
            for row in rows
        ]
        return changes, max((row["changed"] for row in rows), default=0)

    async def _outputs_of_steps(
        self, run_id: str, names: Sequence[str]
    ) -> dict[str, dict[str, ArtifactRef]]:
        found: dict[str, dict[str, ArtifactRef]] = {}
        for start in range(0, len(names), MAX_QUERY_KEYS):
            chunk = list(names[start : start + MAX_QUERY_KEYS])
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT * FROM artifacts WHERE run_id = ? AND step_name IN ({marks})",
                (run_id, *chunk),
            )
            for row in rows:
                found.setdefault(row["step_name"], {})[row["output_name"]] = artifact_ref(row)
        return found

    async def load_state(self, run_id: str) -> RunState:
        """Rebuild the controller's view of a run from the store (after a restart)."""
        run = await self.run_by_id(run_id)
        state = RunState.new(run.id, await self.spec_of(run.id))
        state.status, state.error = run.status, run.error
        rows = await self.db.fetchall(
            "SELECT name, cache_key, lost, redone FROM steps WHERE run_id = ?", (run.id,)
        )
        kept = {row["name"]: row for row in rows}
        for record in await self.steps_of(run.id):
            step = state.steps[record.name]
            step.status, step.attempt = record.status, record.attempt
            step.outputs, step.retry_at = dict(record.outputs), record.retry_at
            row = kept.get(record.name)
            if row is not None:
                step.cache_key = row["cache_key"]
                step.lost, step.redone = row["lost"], row["redone"]
        state.recount()
        if run.retry_of is not None:
            state.retry_of = run.retry_of
            state.previous = await self.retried_steps(run.retry_of)
        return state

    async def reusable(self, keys: Sequence[str], stack_id: str) -> dict[str, tuple[str, str, str]]:
        """For each of ``keys`` that a step of a run on ``stack_id`` completed with, the
        latest such step: (its run, its name, the run that computed its outputs)."""
        found: dict[str, tuple[str, str, str]] = {}
        for start in range(0, len(keys), MAX_QUERY_KEYS):
            chunk = list(keys[start : start + MAX_QUERY_KEYS])
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT cache_key, run_id, name, cached_from FROM steps WHERE cache_key IN"
                f" ({marks}) AND status IN (?, ?) AND run_id IN"
                " (SELECT id FROM runs WHERE stack_id = ?) ORDER BY finished",
                (*chunk, StepStatus.COMPLETED.value, StepStatus.CACHED.value, stack_id),
            )
            for row in rows:  # the latest last: it wins
                origin = row["cached_from"] or row["run_id"]
                found[row["cache_key"]] = (row["run_id"], row["name"], origin)
        return found

    async def step_outputs(
        self, steps: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, ArtifactRef]]:
        """The outputs of each (run, step) of ``steps``."""
        found: dict[tuple[str, str], dict[str, ArtifactRef]] = {}
        for start in range(0, len(steps), MAX_QUERY_KEYS // 2):
            chunk = steps[start : start + MAX_QUERY_KEYS // 2]
            where = " OR ".join("(run_id = ? AND step_name = ?)" for _ in chunk)
            rows = await self.db.fetchall(
                f"SELECT * FROM artifacts WHERE {where}", tuple(v for s in chunk for v in s)
            )
            for row in rows:
                step = (row["run_id"], row["step_name"])
                found.setdefault(step, {})[row["output_name"]] = artifact_ref(row)
        return found

    async def retried_steps(self, run_id: str) -> dict[str, tuple[str | None, str]]:
        """The steps of ``run_id`` that completed or were cached: their cache key and the
        run that computed their outputs, by name (what a retry of the run may reuse)."""
        rows = await self.db.fetchall(
            "SELECT name, cache_key, cached_from FROM steps WHERE run_id = ? AND status IN (?, ?)",
            (run_id, StepStatus.COMPLETED.value, StepStatus.CACHED.value),
        )
        return {row["name"]: (row["cache_key"], row["cached_from"] or run_id) for row in rows}

    async def unfinished(self, run_ids: Sequence[str]) -> set[str]:
        """Which of ``run_ids`` are queued, pending or running (not finished, not deleted)."""
        found: set[str] = set()
        finished = [s.value for s in FINISHED_RUN_STATUSES]
        for start in range(0, len(run_ids), MAX_QUERY_KEYS):
            chunk = list(run_ids[start : start + MAX_QUERY_KEYS])
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT id FROM {SEEN} WHERE id IN ({marks})"
                f" AND status NOT IN ({','.join('?' * len(finished))})",
                (*chunk, *finished),
            )
            found.update(row["id"] for row in rows)
        return found

    async def active_run_ids(self, stack_id: str) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT id FROM runs WHERE stack_id = ? AND status IN (?, ?) ORDER BY created",
            (stack_id, *ACTIVE),
        )
        return [row["id"] for row in rows]

    # --- who submitted a run (the server records it, beside the controller's writes) ---

    async def attribute(self, run_id: str, user: str) -> None:
        """Record who submitted ``run_id``; the first submitter stays (an idempotent replay
        by someone else does not take the run over)."""
        writes = Writes()
        writes.add(
            "INSERT OR IGNORE INTO run_users (run_id, user_name) VALUES (?, ?)", [(run_id, user)]
        )
        await self.db.write(writes)

    async def delete_run(self, run_id: str) -> None:
        run = await self.get_run(run_id)
        check_deletable(run)
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM runs WHERE id = ?", (run.id,))
            await conn.execute("DELETE FROM run_users WHERE run_id = ?", (run.id,))
