"""Shared fixtures: a fresh CONVEYOR_HOME per test, asyncio debug mode, the RabbitMQ gate."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_REQUIRED_ENV = "CONVEYOR_REQUIRE_RABBITMQ"
RABBITMQ_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(autouse=True)
def _asyncio_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own CONVEYOR_HOME; no stack override leaks in."""
    path = tmp_path / "home"
    monkeypatch.setenv("CONVEYOR_HOME", str(path))
    monkeypatch.delenv("CONVEYOR_STACK", raising=False)
    yield path


def rabbitmq_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def rabbitmq() -> str:
    """The AMQP URL of the real broker; skips (or fails under CI) when none answers."""
    if not rabbitmq_available():
        message = "RabbitMQ does not answer on 127.0.0.1:5672"
        if os.environ.get(RABBITMQ_REQUIRED_ENV):
            pytest.fail(f"{message}, and {RABBITMQ_REQUIRED_ENV} is set")
        pytest.skip(message)
    return RABBITMQ_URL


def conveyor_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``conveyor`` command as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor.service.cli.app", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
