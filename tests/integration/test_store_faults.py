"""A metadata store that cannot be used: damaged, or on a disk that is full.

Real SQLite files: garbage bytes, a store cut short, and a real full disk (a tiny tmpfs,
mounted by the test, which needs root). Every command must end within seconds with exit
1 and an error that names the file and says what to do; the controller must back off, say
it is unhealthy, and get on again once the store works.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from conveyor.service import batch_failures
from conveyor.service.pipelines import load_pipeline
from tests.conftest import conveyor_cli
from tests.integration.api_helpers import QUICKSTART, serving

COMMANDS = [
    ("stack", "list"),
    ("stack", "describe"),
    ("run", "list"),
    ("pipeline", "run", "examples/quickstart.py:training_pipeline", "-p", "epochs=1"),
]
# A safety net: the commands answer in about a second; before the fix they never ended.
COMMAND_TIMEOUT_S = 30.0


def _refused(*args: str) -> str:
    """stderr of a ``conveyor`` command that must fail with exit 1 and no traceback."""
    try:
        result = conveyor_cli(*args, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"conveyor {' '.join(args)} hangs") from None
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


def _new_store(home: Path) -> Path:
    result = conveyor_cli("stack", "list")
    assert result.returncode == 0, result.stderr
    return home / "conveyor.db"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_every_command_on_a_damaged_store_exits_1_naming_the_file(damage: str, home: Path) -> None:
    if damage == "garbage":
        home.mkdir(parents=True)
        db = home / "conveyor.db"
        db.write_bytes(os.urandom(16384))
    else:
        db = _new_store(home)
        with db.open("r+b") as file:
            file.truncate(db.stat().st_size // 4)
    for command in COMMANDS:
        error = _refused(*command)
        assert error.startswith("Error: "), error
        assert f"the metadata store {db} is damaged" in error, (command, error)
        assert "restore it from a backup, or move it aside" in error, error


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs of the test's own, unmounted at the end."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=30)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to its last byte; the filler file, to delete for space again."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def home_on_small_disk(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = small_disk / "home"
    monkeypatch.setenv("CONVEYOR_HOME", str(home))
    return home


def test_commands_on_a_full_disk_exit_1_saying_so(home_on_small_disk: Path) -> None:
    db = _new_store(home_on_small_disk)
    _fill(home_on_small_disk.parent)
    for command in COMMANDS:
        error = _refused(*command)
        assert f"cannot write the metadata store {db}" in error, (command, error)
        assert "is its disk full?" in error, error


def test_a_write_on_a_full_disk_while_the_store_is_open_elsewhere_exits_1(
    home_on_small_disk: Path,
) -> None:
    """Another process (a server, a controller) holds the store open, so it opens fine;
    what fails is the first write, after the disk filled up."""
    db = _new_store(home_on_small_disk)
    held = sqlite3.connect(db)
    try:
        held.execute("SELECT count(*) FROM stacks").fetchall()
        _fill(home_on_small_disk.parent)
        for command in [
            ("stack", "register", "other", "-o", "default", "-a", "default"),
            COMMANDS[-1],  # the run's controller (in this command) cannot record the run
        ]:
            error = _refused(*command)
            assert f"the metadata store {db}" in error, (command, error)
            assert "is its disk full?" in error, error
    finally:
        held.close()


async def test_the_controller_backs_off_a_full_store_reports_unhealthy_and_recovers(
    home_on_small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, cap = 0.05, 0.4
    monkeypatch.setattr(batch_failures, "BACK_OFF_S", first)
    monkeypatch.setattr(batch_failures, "BACK_OFF_MAX_S", cap)
    async with serving(home_on_small_disk) as (app, api):
        assert (await api.get("/healthz")).status_code == 200
        conveyor = app.state.conveyor.gateway.served
        filler = await asyncio.to_thread(_fill, home_on_small_disk.parent)
        with capture_logs() as logs:
            run = await conveyor.submit(load_pipeline(QUICKSTART), epochs=1)

            def backing_off() -> list[dict[str, object]]:
                return [e for e in logs if e["event"] == "controller unhealthy: backing off"]

            for _ in range(400):
                if len(backing_off()) >= 6:
                    break
                await asyncio.sleep(0.05)
            attempts = backing_off()
            assert len(attempts) >= 6, logs
            for entry in attempts:
                attempt = int(str(entry["attempt"]))
                interval = min(cap, first * 2 ** (attempt - 1))
                assert interval / 2 <= float(str(entry["retry_in_s"])) <= interval, entry
                assert f"the metadata store {home_on_small_disk / 'conveyor.db'}" in str(
                    entry["error"]
                )
            assert [int(str(e["attempt"])) for e in attempts[:6]] == [1, 2, 3, 4, 5, 6]

            sick = await api.get("/healthz")
            assert sick.status_code == 503, sick.text
            check = sick.json()["checks"]["controller"]
            assert not check["ok"] and "is its disk full?" in check["detail"], check

            filler.unlink()
            record = await run.wait(timeout=60)
            assert record.status.value == "completed", record
        assert conveyor.controller_problem is None
        # Nothing was given up on: the request came back until it could be recorded.
        assert not any(e["event"] == "dead-lettered" for e in logs), logs
        health = await api.get("/healthz")
        assert health.status_code == 200, health.text
