"""The artifacts the runs recorded, as people look them up: listed, or found by their id or
a prefix of it. (The controller and the cache read a run's outputs through ``RunStore``.)"""

from __future__ import annotations

from datetime import datetime

import aiosqlite

from conveyor.contracts import ArtifactRecord, ArtifactRef, NotFoundError
from conveyor.contracts.errors import shown
from conveyor.service.store.db import Database
from conveyor.service.store.id_prefixes import (
    SHOWN_CANDIDATES,
    Candidate,
    check_typed_id,
    could_match,
    pick_id,
)


def artifact_ref(row: aiosqlite.Row) -> ArtifactRef:
    """The reference an ``artifacts`` row holds."""
    return ArtifactRef(
        uri=row["uri"],
        digest=row["digest"],
        size=row["size"],
        materializer=row["materializer"],
        materializer_version=row["materializer_version"],
        data_type=row["data_type"],
    )


def artifact_record(row: aiosqlite.Row) -> ArtifactRecord:
    """The record of an ``artifacts`` row."""
    return ArtifactRecord(
        id=row["id"],
        run_id=row["run_id"],
        step_name=row["step_name"],
        output_name=row["output_name"],
        ref=artifact_ref(row),
        created=datetime.fromisoformat(row["created"]),
    )


class ArtifactRecords:
    """The ``artifacts`` table, read for people (the CLI, the API, the dashboard)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def list_artifacts(
        self, *, run_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[ArtifactRecord]:
        clause, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
        rows = await self.db.fetchall(
            f"SELECT * FROM artifacts {clause} ORDER BY created DESC LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [artifact_record(row) for row in rows]

    async def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        """The artifact of this id, or of the one id that starts with it (for people)."""
        check_typed_id("artifact", artifact_id)
        row = await self.db.fetchone("SELECT * FROM artifacts WHERE id = ?", (artifact_id,))
        if row is not None:
            return artifact_record(row)
        candidates: list[Candidate] = []
        if could_match(artifact_id):
            rows = await self.db.fetchall(
                "SELECT id, run_id, step_name, output_name FROM artifacts"
                " WHERE substr(id, 1, ?) = ? ORDER BY created DESC LIMIT ?",
                (len(artifact_id), artifact_id, SHOWN_CANDIDATES + 1),
            )
            candidates = [
                Candidate(r["id"], f"{r['step_name']}.{r['output_name']} of run {r['run_id']}")
                for r in rows
            ]
        full_id = pick_id("artifact", artifact_id, candidates)
        row = await self.db.fetchone("SELECT * FROM artifacts WHERE id = ?", (full_id,))
        if row is None:  # deleted with its run since
            raise NotFoundError(f"no artifact with id {shown(artifact_id)}")
        return artifact_record(row)
