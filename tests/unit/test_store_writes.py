"""Database.write: the statements of one batch commit together or not at all, whether the
batch is small (run on the event loop's thread) or large (run on aiosqlite's thread)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from conveyor.service.store import Database, Writes
from conveyor.service.store.db import INLINE_ROWS

# Rows of filler that make a batch too large for the event loop's thread.
SIZES = {"small": 0, "large": INLINE_ROWS}


def filler(size: str, start: int = 100) -> list[tuple[str, str]]:
    return [(f"f{start + i}", "filler") for i in range(SIZES[size])]


async def rows(db: Database) -> list[tuple[str, str]]:
    found = await db.fetchall("SELECT id, name FROM stacks_test ORDER BY id")
    return [(r["id"], r["name"]) for r in found]


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "conveyor.db")
    await database.open()
    await database.conn.execute("CREATE TABLE stacks_test (id TEXT PRIMARY KEY, name TEXT)")
    return database


def without_filler(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [row for row in found if row[1] != "filler"]


@pytest.mark.parametrize("size", SIZES)
async def test_every_statement_of_a_batch_is_committed(db: Database, size: str) -> None:
    writes = Writes()
    writes.add("INSERT INTO stacks_test VALUES (?, ?)", [("1", "a"), ("2", "b"), *filler(size)])
    writes.add("UPDATE stacks_test SET name = ? WHERE id = ?", [("B", "2")])
    writes.add("DELETE FROM stacks_test WHERE id = ?", [])  # no rows: not run at all
    await db.write(writes)
    assert without_filler(await rows(db)) == [("1", "a"), ("2", "B")]
    assert len(await rows(db)) == 2 + SIZES[size]
    await db.close()


@pytest.mark.parametrize("size", SIZES)
async def test_a_failing_statement_rolls_back_the_whole_batch(db: Database, size: str) -> None:
    first = Writes()
    first.add("INSERT INTO stacks_test VALUES (?, ?)", [("1", "a")])
    await db.write(first)
    failing = Writes()
    failing.add("UPDATE stacks_test SET name = ? WHERE id = ?", [("changed", "1")])
    failing.add(
        "INSERT INTO stacks_test VALUES (?, ?)", [*filler(size), ("2", "b"), ("1", "duplicate")]
    )
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


async def test_a_small_write_waits_for_another_process_that_holds_the_write_lock(
    db: Database, tmp_path: Path
) -> None:
    """The event loop's thread never waits for SQLite's lock: the write goes to aiosqlite's
    thread, which waits (``busy_timeout``), and commits once the lock is free."""
    other = sqlite3.connect(tmp_path / "conveyor.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO stacks_test VALUES ('0', 'first')")
    writes = Writes()
    writes.add("INSERT INTO stacks_test VALUES (?, ?)", [("1", "a")])
    writing = asyncio.create_task(db.write(writes))
    done, _ = await asyncio.wait([writing], timeout=0.3)
    assert not done  # neither failed with "database is locked" nor blocked the loop
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(writing, 30)
    assert await rows(db) == [("0", "first"), ("1", "a")]
    await db.close()


async def test_a_read_sees_every_write_committed_before_it_while_other_reads_run(
    db: Database,
) -> None:
    """A small write commits through the second connection; a read through the first one,
    started after the write returned, sees it, even while other reads go on around it (a
    read whose statement stayed open between two trips to aiosqlite's thread kept its
    connection's snapshot from before the write, for every read made meanwhile)."""
    await db.write(_rows_of(range(200)))
    stop = asyncio.Event()

    async def read_around() -> None:
        while not stop.is_set():
            await db.fetchall("SELECT * FROM stacks_test")
            await db.fetchone("SELECT * FROM stacks_test WHERE id = ?", ("1",))

    readers = [asyncio.create_task(read_around()) for _ in range(3)]
    try:
        stale = []
        for value in range(300):
            writes = Writes()
            writes.add("UPDATE stacks_test SET name = ? WHERE id = ?", [(str(value), "0")])
            await db.write(writes)
            row = await db.fetchone("SELECT name FROM stacks_test WHERE id = ?", ("0",))
            if row is None or row[0] != str(value):
                stale.append(value)
            if value % 3 == 0:
                await asyncio.sleep(0)  # the readers' trips fall at other points of each read
        assert stale == []
    finally:
        stop.set()
        await asyncio.gather(*readers)
        await db.close()


def _rows_of(ids: range) -> Writes:
    writes = Writes()
    writes.add("INSERT INTO stacks_test VALUES (?, ?)", [(str(i), "row") for i in ids])
    return writes
