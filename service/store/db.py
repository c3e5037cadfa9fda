"""The SQLite connection of one process: WAL, migrations, and serialized write transactions.

Several processes may share one CONVEYOR_HOME. Each process has one connection and writes
through ``transaction()``, which takes SQLite's write lock up front (``BEGIN IMMEDIATE``)
so that concurrent writers wait on ``busy_timeout`` instead of failing with
"database is locked" halfway through a transaction. Each read runs whole in one trip to the
connection's thread, so that it sees every commit made before it began, by this process or
another. Opening (the switch to WAL and the migrations) is serialized across processes by
an advisory lock on a file beside the store: two processes creating a new store at once
could otherwise meet while it is still in rollback-journal mode, where SQLite answers one
of them "database is locked" at once rather than wait (its deadlock rule), and that process
fails before doing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from conveyor.contracts import ConveyorError
from conveyor.service.store.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 30_000
MAX_QUERY_KEYS = 500
"""Values bound in one query at most (SQLite allows 32766; shorter queries plan faster)."""

# What a user can do about each kind of SQLite failure, by its primary result code.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_NO_SPACE = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
_NO_ACCESS = (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM)
_BUSY = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class MetadataStoreError(ConveyorError):
    """The metadata store cannot be read or written (damaged, full, unreachable, locked).

    The message names the file and what to do about it.
    """


def is_store_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the store itself fails (full, damaged, locked, unwritable), so
    that any statement would fail the same way, rather than one statement being wrong."""
    if isinstance(exc, MetadataStoreError):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or not isinstance(code, int):
        return False
    return code & 0xFF in (*_DAMAGED, *_NO_SPACE, *_NO_ACCESS, *_BUSY)


def store_error(path: Path, exc: BaseException) -> MetadataStoreError:
    """``exc`` (a SQLite or OS error on the store at ``path``) as a message a user can act on."""
    if isinstance(exc, MetadataStoreError):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    problem = f"{type(exc).__name__}: {exc}"
    if primary in _DAMAGED:
        return MetadataStoreError(
            f"the metadata store {path} is damaged ({problem}): restore it from a backup, or "
            "move it aside to start with an empty store (its stacks and runs are then gone)"
        )
    if primary in _NO_SPACE or (isinstance(exc, OSError) and not isinstance(exc, TimeoutError)):
        return MetadataStoreError(
            f"cannot write the metadata store {path} ({problem}): is its disk full? Free "
            "space there (or set CONVEYOR_HOME to a folder on another disk), then try again",
            retryable=True,
        )
    if primary in _NO_ACCESS:
        return MetadataStoreError(
            f"cannot open the metadata store {path} ({problem}): check that its folder "
            "exists and that this user may read and write it (or set CONVEYOR_HOME)"
        )
    if primary in _BUSY or isinstance(exc, TimeoutError):
        return MetadataStoreError(
            f"the metadata store {path} is locked by another process ({problem}): try again",
            retryable=True,
        )
    return MetadataStoreError(f"the metadata store {path} failed: {problem}", retryable=True)


def _create_private(path: Path) -> int:
    """Create the store's folder and file readable by their owner only, when they are new
    (the store holds component configurations with their secrets; SQLite gives its WAL and
    shared-memory files the mode of the database file), and take the opening lock: the
    returned descriptor holds it until closed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Polled rather than blocking, so that a process stopped while opening cannot hold
        # every other one for ever.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError("another process is opening it") from None
                time.sleep(0.01)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except BaseException:
        os.close(lock)
        raise
    return lock


class Writes:
    """The statements of one write transaction, gathered before it runs.

    Gathering first lets :meth:`Database.write` run them all in one trip to the
    connection's thread: each trip costs more than a small statement itself.
    """

    def __init__(self) -> None:
        self.statements: list[tuple[str, list[Sequence[Any]]]] = []

    def add(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Execute ``sql`` once per row of parameters (nothing if there are none)."""
        rows = list(rows)
        if rows:
            self.statements.append((sql, rows))


def _run_writes(
    conn: sqlite3.Connection, statements: list[tuple[str, list[Sequence[Any]]]]
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in statements:
            conn.executemany(sql, rows)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """One aiosqlite connection; ``open()``, ``close()`` (idempotent), or ``async with``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the database is not open")
        return self._conn

    async def open(self) -> None:
        """Connect, switch to WAL and apply pending migrations.

        Raises :class:`MetadataStoreError` when the file cannot be used (damaged, on a full
        disk, not writable).
        """
        if self._conn is not None:
            return
        try:
            lock = await asyncio.to_thread(_create_private, self.path)
        except (sqlite3.Error, OSError) as exc:
            raise store_error(self.path, exc) from exc
        try:
            await self._open()
        finally:
            os.close(lock)

    async def _open(self) -> None:
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise store_error(self.path, exc) from exc
        try:
            await self._prepare(conn)
            self._conn = conn
            await self._migrate()
        except BaseException as exc:
            # The connection's thread is not a daemon: left open, it would keep the
            # process from ever exiting after this error.
            self._conn = None
            with contextlib.suppress(sqlite3.Error):
                await conn.close()
            if isinstance(exc, sqlite3.Error | OSError):
                raise store_error(self.path, exc) from exc
            raise

    @staticmethod
    async def _prepare(conn: aiosqlite.Connection) -> None:
        conn.row_factory = aiosqlite.Row
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        async with conn.execute("PRAGMA journal_mode") as cursor:
            mode = (await cursor.fetchone() or ["?"])[0]
        if str(mode).lower() != "wal":
            await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")

    async def _migrate(self) -> None:
        async with self.transaction() as conn:
            async with conn.execute("PRAGMA user_version") as cursor:
                row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")

    async def close(self) -> None:
        """Close the connection; safe to call twice or before ``open``."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, serialized within the process and across processes."""
        async with self._write_lock:
            conn = self.conn
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def write(self, writes: Writes) -> None:
        """Run ``writes`` as one transaction, in one trip to the connection's thread."""
        if not writes.statements:
            return
        async with self._write_lock:
            conn = self.conn
            # aiosqlite has no public way to run several statements in one trip; these two
            # private names have been stable since its early releases (a unit test runs
            # this path, so an upgrade that drops them fails loudly). A connection and
            # thread of the store's own would do it publicly, but a second SQLite thread
            # raised the peak memory of a 50,000-step run from 247 to 300 MB (its own
            # malloc arena and page cache); public calls inside BEGIN IMMEDIATE would make
            # one trip a statement, on every controller batch.
            await conn._execute(_run_writes, conn._conn, writes.statements)  # type: ignore[no-untyped-call]

    # A read runs whole in one trip to the connection's thread: its statement is done and
    # reset before the trip ends. A statement left open between trips (aiosqlite's execute,
    # then fetch, then close: three trips) holds its connection's read transaction, and
    # every other read made on the connection meanwhile sees the store as it was when that
    # one began, without what another process committed since (and announced: a finished
    # run read "running").

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        # aiosqlite's execute_fetchall: the statement runs to its end, which resets it.
        return list(await self.conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        """The first row of ``sql``: for queries of one row (by key, or an aggregate)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None
