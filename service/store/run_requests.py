"""Runs a client requested of a service stack's controller, kept until a controller takes
them (queued), the runs an embedded controller queued (its run queue), and the requests
their client withdrew before any controller did."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from conveyor.contracts import StackSpec
from conveyor.service.store.db import MAX_QUERY_KEYS, Database, Writes

if TYPE_CHECKING:  # typing only: listing runs builds no spec
    from conveyor.contracts import PipelineSpec, RunRequested


def _add(
    writes: Writes,
    run_id: str,
    request: tuple[str, dict[str, Any], str],
    stack: StackSpec,
    key: str | None,
    now: datetime,
    owner: tuple[str, int, str] | None = None,
) -> None:
    """Add the row of a queued request: ``request`` is its pipeline's name, its parameters
    and its spec in JSON."""
    pipeline, parameters, spec = request
    host, pid, token = owner or (None, None, None)
    writes.add(
        "INSERT OR IGNORE INTO run_requests (id, pipeline, stack_id, stack_name, parameters,"
        " spec, created, idempotency_key, owner_host, owner_pid, owner_token)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                run_id,
                pipeline,
                stack.id,
                stack.name,
                json.dumps(parameters),
                spec,
                now.isoformat(),
                key,
                host,
                pid,
                token,
            )
        ],
    )


class RunRequests:
    """The ``run_requests`` and ``withdrawn_requests`` tables: a client's, not run state.

    People see a request as a queued run through the view of runs and requests, which
    :class:`~conveyor.service.store.runs.RunStore` reads.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(
        self, run_id: str, spec: PipelineSpec, stack: StackSpec, key: str | None, now: datetime
    ) -> None:
        """Remember a run this client asked a service stack's controller for: it shows as
        queued until a controller records it (in this store) or the client forgets it."""
        writes = Writes()
        _add(writes, run_id, (spec.name, spec.parameters, spec.model_dump_json()), stack, key, now)
        await self.db.write(writes)

    def record_queued(
        self,
        writes: Writes,
        request: RunRequested,
        stack: StackSpec,
        owner: tuple[str, int, str],
        now: datetime,
    ) -> None:
        """An embedded controller queued ``request`` (its run queue): the run shows as queued
        until the controller records it, or until ``owner``, the controller's process, stops
        or is found dead (``OwnedRuns``)."""
        spec = request.spec
        if spec is None:  # a request that names its pipeline: compiled when it starts
            nothing = {"name": request.pipeline, "parameters": request.parameters, "steps": []}
            shown = (request.pipeline, request.parameters, json.dumps(nothing))
        else:
            shown = (spec.name, spec.parameters, spec.model_dump_json())
        _add(writes, request.run_id, shown, stack, request.idempotency_key, now, owner)

    async def forget(self, run_id: str) -> None:
        """The run was followed to its end: it is queued no longer."""
        writes = Writes()
        writes.add("DELETE FROM run_requests WHERE id = ?", [(run_id,)])
        await self.db.write(writes)

    async def withdraw(self, run_id: str, reason: str, now: datetime) -> None:
        """The client gave up on ``run_id``: if no controller recorded it yet, one that takes
        its request later records it cancelled for ``reason`` and runs none of it."""
        writes = Writes()
        writes.add(
            "INSERT OR IGNORE INTO withdrawn_requests (id, reason, withdrawn)"
            " SELECT id, ?, ? FROM run_requests WHERE id = ? AND id NOT IN (SELECT id FROM runs)",
            [(reason, now.isoformat(), run_id)],
        )
        writes.add("DELETE FROM run_requests WHERE id = ?", [(run_id,)])
        await self.db.write(writes)

    def mark_taken(self, writes: Writes, run_id: str) -> None:
        """A controller records the run of ``run_id`` (in the transaction of ``writes``): its
        request is queued no longer, and its withdrawal, if any, is spent."""
        writes.add("DELETE FROM run_requests WHERE id = ?", [(run_id,)])
        writes.add("DELETE FROM withdrawn_requests WHERE id = ?", [(run_id,)])

    async def withdrawn(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Which of ``run_ids`` their clients withdrew before a controller took them, and
        why (one query per 500 ids)."""
        found: dict[str, str] = {}
        for start in range(0, len(run_ids), MAX_QUERY_KEYS):
            chunk = list(run_ids[start : start + MAX_QUERY_KEYS])
            marks = ",".join("?" * len(chunk))
            rows = await self.db.fetchall(
                f"SELECT id, reason FROM withdrawn_requests WHERE id IN ({marks})", chunk
            )
            found.update((row["id"], row["reason"]) for row in rows)
        return found

    async def is_requested(self, run_id: str) -> bool:
        """Whether ``run_id`` is a request no controller recorded yet (queued). One small
        row: neither the request's spec nor the view of runs and requests is read."""
        row = await self.db.fetchone("SELECT 1 AS found FROM run_requests WHERE id = ?", (run_id,))
        return row is not None
