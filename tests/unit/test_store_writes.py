"""Database.write: the statements of one batch commit together or not at all."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conveyor.service.store import Database, Writes


async def rows(db: Database) -> list[tuple[str, str]]:
    found = await db.fetchall("SELECT id, name FROM stacks_test ORDER BY id")
    return [(r["id"], r["name"]) for r in found]


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "conveyor.db")
    await database.open()
    await database.conn.execute("CREATE TABLE stacks_test (id TEXT PRIMARY KEY, name TEXT)")
    return database


async def test_every_statement_of_a_batch_is_committed(db: Database) -> None:
    writes = Writes()
    writes.add("INSERT INTO stacks_test VALUES (?, ?)", [("1", "a"), ("2", "b")])
    writes.add("UPDATE stacks_test SET name = ? WHERE id = ?", [("B", "2")])
    writes.add("DELETE FROM stacks_test WHERE id = ?", [])  # no rows: not run at all
    await db.write(writes)
    assert await rows(db) == [("1", "a"), ("2", "B")]
    await db.close()


async def test_a_failing_statement_rolls_back_the_whole_batch(db: Database) -> None:
    first = Writes()
    first.add("INSERT INTO stacks_test VALUES (?, ?)", [("1", "a")])
    await db.write(first)
    failing = Writes()
    failing.add("UPDATE stacks_test SET name = ? WHERE id = ?", [("changed", "1")])
    failing.add("INSERT INTO stacks_test VALUES (?, ?)", [("2", "b"), ("1", "duplicate")])
    with pytest.raises(sqlite3.IntegrityError):
        await db.write(failing)
    assert await rows(db) == [("1", "a")]
    # The connection is usable again: the failed transaction did not stay open.
    assert not db.conn.in_transaction
    again = Writes()
    again.add("INSERT INTO stacks_test VALUES (?, ?)", [("2", "b")])
    await db.write(again)
    assert await rows(db) == [("1", "a"), ("2", "b")]
    await db.close()
