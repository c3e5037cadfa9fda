"""Shared fixtures: a fresh CONVEYOR_HOME per test, asyncio debug mode, the RabbitMQ gate."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conveyor.service.logs import configure_logging
from tests.subprocesses import free_port, stop, wait_until_answers

if TYPE_CHECKING:
    from tests.integration.rabbitmq_support import VhostPool

# The test process is an application that embeds Conveyor: it configures structlog itself,
# once, as the CLI and the service processes do (Conveyor.start() leaves it alone).
configure_logging()
# pytest-xdist's workers set COLUMNS=80, which the CLI takes as a terminal's width (and reads
# once, at import): the tests read the CLI's piped output, which a script gets at full width.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_REQUIRED_ENV = "CONVEYOR_REQUIRE_RABBITMQ"
RABBITMQ_URL = os.environ.get("CONVEYOR_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(autouse=True)
def _process_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's debug mode, and no bytecode written, here and in every process a test
    starts: tests rewrite a pipeline file and run it again within a second, and Python would
    take the first version's bytecode for the second when the file kept its size (a pyc is
    checked by the source's mtime in seconds and its size). CI compiles the checkout first."""
    monkeypatch.setenv("PYTHONASYNCIODEBUG", "1")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


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


@pytest.fixture(scope="session")
def vhost_pool() -> Iterator[VhostPool]:
    """Fresh RabbitMQ virtual hosts, made and deleted in batches (see ``VhostPool``)."""
    from tests.integration.rabbitmq_support import VhostPool

    pool = VhostPool(RABBITMQ_URL)
    try:
        yield pool
    finally:
        pool.delete_all()


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


# --- `conveyor server up` in a subprocess (server and browser tests) ---


SERVER_UP = (sys.executable, "-m", "conveyor.service.cli.app", "server", "up")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return f"stdout:\n{self.stdout.read_text()}\nstderr:\n{self.stderr.read_text()}"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def running_server(
    logs: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> Iterator[Server]:
    """Start the server on a free port, wait until /healthz answers, stop it at the end."""
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "server.out", logs / "server.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*SERVER_UP, "--port", str(port), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=err,
        )
    server = Server(f"http://127.0.0.1:{port}", process, stdout, stderr)
    try:
        wait_until_answers(f"{server.url}/healthz", process, server.output, timeout)
        yield server
    finally:
        stop(process)


# --- a real S3 endpoint: moto's server (see tests/s3_support.py) ---

from tests.s3_support import (  # noqa: E402  (appended section; boto3 is a dev dependency)
    TEST_KEY,
    TEST_REGION,
    TEST_SECRET,
    S3Bucket,
    moto_server,
    new_bucket,
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server shared by the session; any key is accepted."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket on ``s3_server``, with test keys and region in the AWS_* environment
    variables and no profile, token or endpoint override."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_REGION", TEST_REGION)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return S3Bucket(s3_server, new_bucket(s3_server))
