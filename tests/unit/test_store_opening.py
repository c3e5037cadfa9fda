"""Opening the store: processes that open a new store at once all succeed, and one that is
stuck while opening holds the others for a bounded time with a clear error."""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest

from conveyor.service.store import Database, MetadataStoreError
from conveyor.service.store import db as db_module


def _open_when_released(path: str, start: object, results: object) -> None:
    async def go() -> None:
        database = Database(Path(path))
        await database.open()
        await database.fetchall("SELECT * FROM stacks")
        await database.close()

    start.wait()  # type: ignore[attr-defined]
    try:
        asyncio.run(go())
        results.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_creating_one_store_at_once_all_open_it(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        path = tmp_path / str(attempt) / "home" / "conveyor.db"
        start, results = context.Barrier(6), context.Queue()
        procs = [
            context.Process(target=_open_when_released, args=(str(path), start, results))
            for _ in range(6)
        ]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=10)
        assert outcomes == ["ok"] * 6


async def test_a_process_stuck_while_opening_holds_others_for_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "conveyor.db"
    async with Database(path):  # created and migrated once
        pass
    lock = os.open(tmp_path / "conveyor.db.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a process stopped in the middle of opening
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_MS", 300)
    try:
        with pytest.raises(MetadataStoreError, match="is locked by another process"):
            await Database(path).open()
    finally:
        os.close(lock)
    database = Database(path)
    await database.open()  # once released, it opens
    await database.close()
