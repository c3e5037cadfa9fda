"""Aggregate reads over runs and steps: per pipeline, per status, step-duration buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel

from conveyor.contracts import RunStatus
from conveyor.service.store.db import Database


class PipelineSummary(BaseModel):
    """A pipeline as seen through its runs: how many, and the latest one."""

    name: str
    runs: int
    last_run_id: str
    last_status: RunStatus
    last_created: datetime


@dataclass(frozen=True)
class DurationBuckets:
    """Cumulative counts of step durations at or below each bound (a Prometheus histogram)."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    count: int
    total: float


class RunSummaries:
    """Read-only queries that count rather than list."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def pipelines(
        self, *, name: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[PipelineSummary]:
        """Distinct pipelines that ran, the most recently run first."""
        clause, params = ("WHERE pipeline = ?", [name]) if name is not None else ("", [])
        # SQLite takes the bare columns (id, status) from the row that holds MAX(created).
        rows = await self.db.fetchall(
            "SELECT pipeline, COUNT(*) AS runs, MAX(created) AS last_created, id, status"
            f" FROM runs {clause} GROUP BY pipeline ORDER BY last_created DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [
            PipelineSummary(
                name=row["pipeline"],
                runs=row["runs"],
                last_run_id=row["id"],
                last_status=RunStatus(row["status"]),
                last_created=datetime.fromisoformat(row["last_created"]),
            )
            for row in rows
        ]

    async def runs_by_status(self) -> list[tuple[str, RunStatus, int]]:
        """(stack name, status, number of runs) for every combination that has runs."""
        rows = await self.db.fetchall(
            "SELECT stack_name, status, COUNT(*) AS n FROM runs GROUP BY stack_name, status"
            " ORDER BY stack_name, status"
        )
        return [(row["stack_name"], RunStatus(row["status"]), row["n"]) for row in rows]

    async def step_durations(self, bounds: Sequence[float]) -> DurationBuckets:
        """How long finished step attempts took, bucketed by ``bounds`` (ascending)."""
        columns = ", ".join(
            f"SUM(CASE WHEN duration_s <= ? THEN 1 ELSE 0 END) AS b{i}" for i in range(len(bounds))
        )
        row = await self.db.fetchone(
            f"SELECT COUNT(*) AS n, COALESCE(SUM(duration_s), 0.0) AS total"
            f"{', ' + columns if columns else ''} FROM steps WHERE duration_s IS NOT NULL",
            tuple(bounds),
        )
        assert row is not None
        return DurationBuckets(
            bounds=tuple(bounds),
            cumulative=tuple(int(row[f"b{i}"] or 0) for i in range(len(bounds))),
            count=int(row["n"]),
            total=float(row["total"]),
        )

    async def ping(self) -> None:
        """Raise unless the store answers a query."""
        await self.db.fetchone("SELECT 1")
