"""Database: the statements of one write batch commit together or not at all, and a read
sees every commit made before it began."""

from __future__ import annotations

import asyncio
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


async def test_a_read_sees_what_another_connection_committed_before_it_while_others_read(
    db: Database, tmp_path: Path
) -> None:
    """A read that begins after another connection (another process) committed sees the
    commit, even while other reads go on around it: a read whose statement stayed open
    between two trips to aiosqlite's thread held its connection's read transaction, and
    every read made meanwhile saw the store from before the commit."""
    filler = Writes()
    filler.add("INSERT INTO stacks_test VALUES (?, ?)", [(str(i), "row") for i in range(200)])
    await db.write(filler)
    other = sqlite3.connect(tmp_path / "conveyor.db", isolation_level=None)
    stop = asyncio.Event()

    async def read_around() -> None:
        while not stop.is_set():
            await db.fetchall("SELECT * FROM stacks_test")
            await db.fetchone("SELECT * FROM stacks_test WHERE id = ?", ("1",))

    readers = [asyncio.create_task(read_around()) for _ in range(3)]
    stale = []
    try:
        for value in range(300):
            other.execute("UPDATE stacks_test SET name = ? WHERE id = '0'", (str(value),))
            row = await db.fetchone("SELECT name FROM stacks_test WHERE id = ?", ("0",))
            if row is None or row[0] != str(value):
                stale.append(value)
            if value % 3 == 0:
                await asyncio.sleep(0)  # the readers' trips fall at other points of each read
    finally:
        stop.set()
        await asyncio.gather(*readers)
        other.close()
        await db.close()
    assert stale == []
