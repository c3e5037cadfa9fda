"""Fixtures and helpers of the RabbitMQ tests: a vhost per test, a stack on it, processes.

Every test gets a fresh virtual host, deleted afterwards with everything declared in it, so
tests cannot see each other's messages. Processes are real ``conveyor`` commands; whatever
a test leaves running is killed at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pytest

from conveyor.contracts import ComponentType, RunRecord, StackSpec, StepStatus
from conveyor.service.client import Client
from conveyor.service.context import Services
from tests.conftest import ROOT
from tests.pipelines.rabbitmq_pipelines import MARKERS_ENV

STACK = "prod"
PIPELINES = "tests/pipelines/rabbitmq_pipelines.py"
CLI = "conveyor.service.cli.app"
"""The module that ``python -m`` runs as the ``conveyor`` command."""


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost(broker_url: str) -> Iterator[str]:
    """The AMQP URL of a new virtual host of ``broker_url``'s broker, deleted on exit."""
    name = f"conveyor-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"{broker_url.rstrip('/')}/{quote(name, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", name)


class VhostPool:
    """Fresh virtual hosts made and deleted in batches.

    ``rabbitmqctl`` starts an Erlang VM per call (one to two seconds here); three calls per
    test (add, set_permissions, delete) cost minutes over the suite. The pool makes ``BATCH``
    vhosts, with the guest user's permissions, in one ``import_definitions`` call, hands each
    out once, and deletes the used ones in one ``eval`` call at the end of the session. Each
    test still gets a vhost that nothing else has used.
    """

    BATCH = 12

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url.rstrip("/")
        self.ready: list[str] = []
        self.made: list[str] = []

    def _make_batch(self) -> None:
        names = [f"conveyor-test-{uuid.uuid4().hex[:12]}" for _ in range(self.BATCH)]
        definitions = {
            "vhosts": [{"name": name} for name in names],
            "permissions": [
                {"user": "guest", "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                for name in names
            ],
        }
        self.made.extend(names)
        # rabbitmqctl reads the file as the rabbitmq user (and 3.10's cannot read stdin): a
        # world-readable file in the system's temporary directory, not in pytest's.
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="conveyor-vhosts-") as file:
            json.dump(definitions, file)
            file.flush()
            os.chmod(file.name, 0o644)
            rabbitmqctl("import_definitions", file.name)
        self.ready.extend(names)

    def take(self) -> str:
        """The AMQP URL of a virtual host that no test has had."""
        if not self.ready:
            self._make_batch()
        return f"{self.broker_url}/{quote(self.ready.pop(), safe='')}"

    def delete_all(self) -> None:
        if not self.made:
            return
        names = ", ".join(f'<<"{name}">>' for name in self.made)
        # catch: a vhost whose batch failed half-way may not exist; the others still go.
        rabbitmqctl(
            "eval", f'[catch rabbit_vhost:delete(V, <<"conveyor-tests">>) || V <- [{names}]].'
        )
        self.made.clear()


@pytest.fixture
def vhost(rabbitmq: str, vhost_pool: VhostPool) -> str:
    """The AMQP URL of a fresh virtual host (deleted at the end of the session; the pool is
    ``tests/conftest.py``'s ``vhost_pool``)."""
    return vhost_pool.take()


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder where test steps record their starts and wait for their release."""
    path = tmp_path / "markers"
    path.mkdir()
    monkeypatch.setenv(MARKERS_ENV, str(path))
    return path


async def register_stack(
    url: str, artifacts: Path, *, name: str = STACK, home: Path | None = None, **config: Any
) -> StackSpec:
    """Register a rabbitmq stack in this test's CONVEYOR_HOME (or ``home``), active."""
    services = await Services.open(home)
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR,
            "rmq",
            "rabbitmq",
            {"url": url, "concurrency": 2, "reconnect_interval_s": 0.5, **config},
        )
        await services.stacks.register_component(
            ComponentType.ARTIFACT_STORE, "shared", "local", {"path": str(artifacts)}
        )
        return await services.stacks.register_stack(
            name,
            {ComponentType.ORCHESTRATOR: "rmq", ComponentType.ARTIFACT_STORE: "shared"},
            activate=True,
        )
    finally:
        await services.close()


def run_id_in(output: str) -> str:
    """The run id that ``pipeline run`` printed (to stderr, with the run's progress)."""
    found = re.search(r"as run ([0-9a-f]{32})", output)
    assert found, output
    return found.group(1)


def only_run(client: Client) -> RunRecord:
    [run] = client.list_runs()
    return run


def assert_committed_once(client: Client, run_id: str) -> None:
    """Each step completed once, at attempt 1, with one recorded artifact per output."""
    steps = client.get_steps(run_id)
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        (s.name, StepStatus.COMPLETED, 1) for s in steps
    ]
    artifacts = client.list_artifacts(run_id=run_id)
    keys = [(a.step_name, a.output_name) for a in artifacts]
    assert sorted(keys) == sorted({(s.name, o) for s in steps for o in s.outputs})


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` until it holds; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def starts(markers: Path) -> list[tuple[str, int]]:
    """(step name, pid) of every step start recorded so far, in order."""
    path = markers / "starts.log"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        name, pid = line.split()
        found.append((name, int(pid)))
    return found


def release(markers: Path, name: str) -> None:
    (markers / f"release-{name}").touch()


def cancel_while_its_step_runs(markers: Path, processes: Processes) -> str:
    """Run ``waiting_chain``, cancel it with ``conveyor run cancel`` once its waiting step
    runs, and wait until that step was stopped; the run's id."""
    from tests.conftest import conveyor_cli

    follower = processes.start("run", "pipeline", "run", f"{PIPELINES}:waiting_chain")
    wait_until(lambda: any(n == "wait" for n, _ in starts(markers)), "the waiting step to start")
    with Client() as client:
        run_id = only_run(client).id
    result = conveyor_cli("run", "cancel", run_id)
    assert result.returncode == 0, result.stderr + processes.dump()
    assert follower.wait(60) == 1
    wait_until(lambda: (markers / "cancelled-wait").exists(), "the running step to be stopped")
    return run_id


class Process:
    """A ``conveyor`` command running in the background, its output in a log file."""

    def __init__(
        self, label: str, args: list[str], logs: Path, env: dict[str, str], module: str = CLI
    ) -> None:
        self.label = label
        self.args = args
        self.log_path = logs / f"{label}.log"
        self._log: IO[str] = open(self.log_path, "w")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text()

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status, once the process ended within ``timeout``."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.label} still running after {timeout:g}s:\n{self.output()[-3000:]}"
            ) from None
        self._log.close()
        return code

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def wait_for_log(self, text: str, timeout: float = 60.0) -> None:
        def logged() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.label} exited early:\n{self.output()[-3000:]}")
            return text in self.output()

        wait_until(logged, f"{self.label} to log {text!r}", timeout)


class Processes:
    """Starts ``conveyor`` processes for one test; kills the ones still alive at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Process] = []

    def start(
        self, label: str, *args: str, env: dict[str, str] | None = None, module: str = CLI
    ) -> Process:
        """``python -m module ARGS`` (the ``conveyor`` command unless ``module`` says)."""
        full_env = {**os.environ, "CONVEYOR_LOG_LEVEL": "INFO", **(env or {})}
        full_env.pop("PYTHONASYNCIODEBUG", None)  # debug mode slows services down a lot
        process = Process(label, list(args), self.logs, full_env, module)
        self.started.append(process)
        return process

    def controller(self, label: str = "controller", module: str = CLI, **env: str) -> Process:
        process = self.start(label, "controller", "start", "--stack", STACK, env=env, module=module)
        process.wait_for_log("controller started")
        return process

    def worker(self, label: str, *args: str) -> Process:
        process = self.start(label, "worker", "start", "--stack", STACK, "--name", label, *args)
        process.wait_for_log("worker started")
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.kill()

    def dump(self) -> str:
        return "\n".join(f"--- {p.label} ---\n{p.output()[-4000:]}" for p in self.started)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()
