"""``pipeline run`` on a rabbitmq stack with nobody to take the run: it says who is missing
and how to start them, and Ctrl+C withdraws the request. Real RabbitMQ, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conveyor.contracts import RunStatus, StepStatus
from conveyor.service.client import Client
from tests.conftest import ROOT, conveyor_cli
from tests.integration.rabbitmq_support import (
    PIPELINES,
    STACK,
    Processes,
    markers,
    processes,
    register_stack,
    vhost,
    wait_until,
)

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Follower:
    """``conveyor pipeline run`` in the background, its output in files read as it comes."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.out_path, self.err_path = folder / "run.out", folder / "run.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor.service.cli.app", "pipeline", "run", *args],
                cwd=ROOT,
                env={k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"},
                stdout=out,
                stderr=err,
                # Ctrl+C reaches it even from a test run in the background.
                preexec_fn=_default_sigint,
            )

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def said(self, text: str) -> bool:
        return text in self.err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def test_no_controller_and_no_worker_are_named_and_ctrl_c_withdraws_the_run(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    follower = Follower(tmp_path, f"{PIPELINES}:pooled")
    try:
        wait_until(
            lambda: follower.said("no worker of pool 'gpu'"), "the missing consumers", timeout=30
        )
        assert follower.said(
            f"no controller consumes conveyor.{STACK}.runs; start one with: "
            f"conveyor controller start --stack {STACK}"
        ), follower.err
        assert follower.said(f"start one with: conveyor worker start --stack {STACK}\n")
        assert follower.said(f"start one with: conveyor worker start --stack {STACK} --pool gpu")
        assert follower.proc.poll() is None, "it keeps waiting"
        # The waiting run shows, queued, with its steps not started.
        listed = conveyor_cli("run", "list")
        assert listed.returncode == 0, listed.stderr
        assert "queued" in listed.stdout and "pooled" in listed.stdout, listed.stdout
        [queued] = json.loads(conveyor_cli("run", "list", "-o", "json").stdout)
        assert queued["status"] == "queued"
        described = conveyor_cli("run", "describe", queued["id"][:8])
        assert described.returncode == 0, described.stderr
        assert "on_gpu" in described.stdout and "pending" in described.stdout
        interrupted = time.monotonic()
        follower.proc.send_signal(signal.SIGINT)
        follower.proc.wait(timeout=30)
        took = time.monotonic() - interrupted
    finally:
        follower.kill()
    assert follower.proc.returncode == 130
    assert took < 4, f"Ctrl+C took {took:.1f}s"  # it waited 5 s for a controller before
    assert follower.said("withdrawn: no controller had taken it"), follower.err
    assert json.loads(conveyor_cli("run", "list", "-o", "json").stdout) == [], "withdrawn"
    # A controller and workers that come later record the run cancelled and run none of it.
    processes.controller()
    processes.worker("w1")
    processes.worker("w2", "--pool", "gpu")
    with Client() as client:
        wait_until(lambda: len(client.list_runs()) == 1, "the run to be recorded")
        (run,) = client.list_runs()
        assert run.status is RunStatus.CANCELLED and "Ctrl+C" in (run.error or "")
        steps = client.get_steps(run.id)
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        ("seed", StepStatus.CANCELLED, 0),
        ("on_gpu", StepStatus.CANCELLED, 0),
    ]
    assert not (markers / "starts.log").exists(), "no step ran"


def test_a_pool_without_a_worker_is_named_until_one_comes(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1")
    follower = Follower(tmp_path, f"{PIPELINES}:pooled")
    try:
        wait_until(lambda: follower.said("no worker of pool 'gpu'"), "the missing worker", 30)
        assert not follower.said("no controller"), follower.err
        assert not follower.said("pool 'default'"), follower.err
        with Client() as client:
            (run,) = client.list_runs()
            assert run.status is RunStatus.RUNNING
        processes.worker("w2", "--pool", "gpu")
        follower.proc.wait(timeout=60)
    finally:
        follower.kill()
    assert follower.proc.returncode == 0, follower.err + processes.dump()
    assert "on_gpu.output = 2" in follower.out_path.read_text()


SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.pipelines.rabbitmq_pipelines import pooled
pooled()
"""


def test_a_pipeline_called_from_python_says_what_it_waits_for(
    vhost: str, tmp_path: Path, markers: Path
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    script = tmp_path / "call.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    err = tmp_path / "call.err"
    with open(err, "w") as stderr:
        call = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stderr=stderr)
    try:
        wait_until(lambda: "no controller consumes" in err.read_text(), "the message", 30)
    finally:
        call.kill()
        call.wait(timeout=30)
    assert f"conveyor controller start --stack {STACK}" in err.read_text()
