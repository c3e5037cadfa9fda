"""Workers that share nothing with the client but the broker and an S3 store.

Each worker runs in a mount namespace of its own where the client's directory and home are
empty tmpfs mounts, in an empty working directory with its own CONVEYOR_HOME: as on another
machine, it can read neither the pipeline file nor the client's artifacts. It gets the
stack from a file, the broker URL and S3 credentials from its environment, and the step
code from the run's code archive in S3.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aio_pika
import boto3
import pytest

from conveyor.contracts import (
    ComponentType,
    RunStatus,
    StackSpec,
    StepReady,
    StepSpec,
    StepStatus,
    new_id,
    parse_event,
)
from conveyor.service.client import Client
from conveyor.service.context import Services
from conveyor.service.pipelines import load_pipeline
from conveyor.service.processes import with_url
from conveyor.workers.code_archive import attach_code
from conveyor.workers.flavors import make_artifact_store, make_broker
from conveyor.workers.rabbitmq_topology import REASON_HEADER
from tests.conftest import conveyor_cli, free_port
from tests.integration.rabbitmq_support import (
    STACK,
    Processes,
    processes,
    run_id_in,
    vhost,
    wait_until,
)
from tests.s3_support import S3Bucket, auth_server

__all__ = ["processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

PIPELINE = """
from __future__ import annotations

import os

import numpy as np

from conveyor import pipeline, step

VERSION = {version}
CLIENT_FILE = {client_file!r}


@step
def where() -> dict[str, object]:
    return {{
        "version": VERSION,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "sees_client_file": os.path.exists(CLIENT_FILE),
    }}


@step
def make(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) * VERSION


@step
def total(xs: np.ndarray, seen: dict[str, object]) -> dict[str, object]:
    return {{"sum": float(xs.sum()), "version": VERSION, "pid": os.getpid(), "seen": seen}}


@pipeline
def scale_out(n: int = 1000) -> None:
    total(make(n), where())
"""


@dataclass
class Isolated:
    """A worker process in its own mount namespace."""

    label: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[str]

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[list[Isolated]]:
    started: list[Isolated] = []
    yield started
    for worker in started:
        worker.stop()


def start_isolated_worker(
    label: str, *, tmp_path: Path, hidden: list[Path], stack_file: Path, url: str
) -> Isolated:
    """``conveyor worker start`` where ``hidden`` folders are empty, in an empty cwd."""
    own = tmp_path / label
    (own / "cwd").mkdir(parents=True)
    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(p))}" for p in hidden)
    command = shlex.join(
        [
            sys.executable,
            "-m",
            "conveyor.service.cli.app",
            "worker",
            "start",
            "--stack-file",
            str(stack_file),
            "--url",
            url,
            "--name",
            label,
            "--concurrency",
            "2",
        ]
    )
    script = f"{mounts} && cd {shlex.quote(str(own / 'cwd'))} && exec {command}"
    env = {**os.environ, "CONVEYOR_HOME": str(own / "home"), "CONVEYOR_LOG_LEVEL": "INFO"}
    env.pop("PYTHONASYNCIODEBUG", None)
    env.pop("CONVEYOR_STACK", None)
    log_path = tmp_path / f"{label}.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed by stop)
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    worker = Isolated(label, proc, log_path, log)

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{label} exited early:\n{worker.output()[-3000:]}")
        return "worker started" in worker.output()

    wait_until(started, f"{label} to start")
    return worker


async def register_s3_stack(url: str, bucket: S3Bucket) -> None:
    services = await Services.open()
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "rmq", "rabbitmq", {"url": url, "concurrency": 2}
        )
        await services.stacks.register_component(
            ComponentType.ARTIFACT_STORE,
            "s3",
            "s3",
            {"bucket": bucket.bucket, "endpoint_url": bucket.endpoint, "prefix": "team"},
        )
        await services.stacks.register_stack(
            STACK,
            {ComponentType.ORCHESTRATOR: "rmq", ComponentType.ARTIFACT_STORE: "s3"},
            activate=True,
        )
    finally:
        await services.close()


def object_keys(bucket: S3Bucket) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=bucket.endpoint)
    listed = s3.list_objects_v2(Bucket=bucket.bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


@dataclass
class Team:
    """A rabbitmq + s3 stack, a controller sharing the client's store, a client folder with
    a pipeline file in it, and the stack exported to a file outside that folder."""

    vhost: str
    tmp_path: Path
    home: Path
    isolated: list[Isolated]
    client_dir: Path
    stack_file: Path

    @property
    def pipeline_file(self) -> Path:
        return self.client_dir / "team_pipeline.py"

    def write(self, version: int, extra: str = "") -> None:
        text = PIPELINE.format(version=version, client_file=str(self.pipeline_file))
        self.pipeline_file.write_text(text + extra)

    def worker(self, label: str) -> Isolated:
        """A worker that sees neither the client's folder nor its home."""
        worker = start_isolated_worker(
            label,
            tmp_path=self.tmp_path,
            hidden=[self.client_dir, self.home],
            stack_file=self.stack_file,
            url=self.vhost,
        )
        self.isolated.append(worker)
        return worker

    def run(self, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return conveyor_cli(
            "pipeline", "run", "team_pipeline.py:scale_out", cwd=self.client_dir, timeout=timeout
        )


@pytest.fixture
def team(
    vhost: str,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    home: Path,
    processes: Processes,
    isolated: list[Isolated],
) -> Team:
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    asyncio.run(register_s3_stack(vhost, s3_bucket))
    stack_file = tmp_path / "shared" / "stack.yaml"
    stack_file.parent.mkdir()
    exported = conveyor_cli("stack", "export", STACK, str(stack_file))
    assert exported.returncode == 0, exported.stderr
    processes.controller()  # the controller may share the client's metadata store
    made = Team(vhost, tmp_path, home, isolated, client_dir, stack_file)
    made.write(version=1)
    return made


def test_a_file_that_only_the_client_has_runs_on_workers_that_share_nothing(
    team: Team, s3_bucket: S3Bucket, tmp_path: Path, home: Path, processes: Processes
) -> None:
    client_dir = team.client_dir
    workers = [team.worker(f"w{i}") for i in (1, 2)]
    worker_pids = {w.proc.pid for w in workers}

    for version in (1, 2):
        team.write(version)
        result = team.run()
        logs = "\n".join(f"--- {w.label}\n{w.output()[-3000:]}" for w in workers)
        assert result.returncode == 0, result.stdout + result.stderr + logs + processes.dump()
        run_id = run_id_in(result.stderr)
        with Client() as client:
            run = client.get_run(run_id)
            assert run.status is RunStatus.COMPLETED
            steps = client.get_steps(run_id)
            assert {s.status for s in steps} == {StepStatus.COMPLETED}
            assert {s.pid for s in steps} <= worker_pids
            [total] = [a for a in client.list_artifacts(run_id=run_id) if a.step_name == "total"]
            assert total.ref.uri.startswith(f"s3://{s3_bucket.bucket}/team/")
            value = client.load_artifact(total.id)
        # Each run executed its own version of the file, on a worker that cannot see it.
        assert value["version"] == version
        assert value["sum"] == version * sum(range(1000))
        assert value["pid"] in worker_pids
        assert value["seen"]["sees_client_file"] is False
        assert value["seen"]["cwd"] != str(client_dir)

    # Outputs live in S3 only: no artifact directory on the client or the workers.
    assert not (home / "artifacts").exists()
    assert {p.name for p in client_dir.iterdir()} <= {"team_pipeline.py", "__pycache__"}
    keys = object_keys(s3_bucket)
    assert keys and all(k.startswith("team/") for k in keys)
    for worker in workers:
        assert not (tmp_path / worker.label / "home" / "artifacts").exists()
        assert worker.proc.poll() is None, worker.output()


HELPER = """

def helper() -> None:
    open({marker!r}, "w").close()
"""

EVIL = """
open({marker!r}, "w").close()


def f() -> None:
    open({marker!r}, "w").close()
"""


async def publish_and_read_dead_letters(
    url: str, steps: list[StepSpec], expected: int
) -> dict[str, str]:
    """Publish a StepReady for each of ``steps``; the dead-letter reasons by step name."""
    stack = await stack_spec()
    broker = make_broker(with_url(stack, url))
    await broker.start()
    try:
        await broker.publish([StepReady(run_id=new_id(), step=step, attempt=1) for step in steps])
        topology = broker.topology
    finally:
        await broker.stop()
    reasons: dict[str, str] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(topology.dead_letter_queue, passive=True)
        deadline = asyncio.get_running_loop().time() + 60
        while len(reasons) < expected:
            message = await dead.get(fail=False)
            if message is None:
                assert asyncio.get_running_loop().time() < deadline, reasons
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            event = parse_event(message.body)
            assert isinstance(event, StepReady)
            reasons[event.step.name] = str(message.headers[REASON_HEADER])
    return reasons


async def stack_spec() -> StackSpec:
    services = await Services.open()
    try:
        return await services.stacks.get(STACK)
    finally:
        await services.close()


def test_hostile_step_messages_are_dead_lettered_and_nothing_of_them_runs(
    team: Team, vhost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_dir = team.client_dir
    markers = {name: tmp_path / f"marker-{name}" for name in ("system", "escape", "plain")}
    team.write(version=1, extra=HELPER.format(marker=str(markers["plain"])))
    elsewhere = tmp_path / "evil" / "elsewhere.py"
    elsewhere.parent.mkdir()
    elsewhere.write_text(EVIL.format(marker=str(markers["escape"])))
    worker = team.worker("w1")

    # A real code archive of the client's file, as a run would carry it.
    monkeypatch.chdir(client_dir)  # undone after the test: later ones start where they did
    definition = load_pipeline("team_pipeline.py:scale_out")
    spec, definitions = definition.compile()
    store = make_artifact_store(asyncio.run(stack_spec()))
    packed = attach_code(spec, definitions, store)
    code = packed.steps[0].code
    assert code is not None

    hostile = [
        StepSpec(
            name="system", ref="os:system", parameters={"command": f"touch {markers['system']}"}
        ),
        StepSpec(name="escape", ref="../evil/elsewhere.py:f", code=code),
        StepSpec(name="absolute", ref=f"{elsewhere}:f", code=code),
        StepSpec(name="plain", ref="team_pipeline.py:helper", code=code),
        StepSpec(name="not-a-step", ref="json:dumps", parameters={"obj": 1}),
    ]
    reasons = asyncio.run(publish_and_read_dead_letters(vhost, hostile, len(hostile)))
    assert set(reasons) == {s.name for s in hostile}
    assert "os" in reasons["system"] and "trust" in reasons["system"], reasons["system"]
    assert "step" in reasons["plain"], reasons["plain"]
    for name in ("escape", "absolute"):
        assert "elsewhere.py" in reasons[name], reasons[name]
    for marker in markers.values():
        assert not marker.exists(), marker

    # The worker is still up and takes the next good run.
    assert worker.proc.poll() is None, worker.output()
    result = team.run()
    assert result.returncode == 0, result.stdout + result.stderr + worker.output()[-3000:]
    assert not any(marker.exists() for marker in markers.values())


def test_a_store_that_cannot_be_used_fails_the_submit_and_workers_keep_going(
    team: Team, s3_bucket: S3Bucket
) -> None:
    worker = team.worker("w1")

    dead_port = free_port()
    broken = {
        "missing bucket": (["--bucket", "no-such-bucket-here"], "no-such-bucket-here"),
        "unreachable endpoint": (
            ["--endpoint-url", f"http://127.0.0.1:{dead_port}"],
            f"127.0.0.1:{dead_port}",
        ),
    }
    for what, (options, named) in broken.items():
        update = conveyor_cli("artifact-store", "update", "s3", *options)
        assert update.returncode == 0, update.stderr
        result = team.run(timeout=90)
        assert result.returncode == 1, (what, result.stdout, result.stderr)
        message = result.stdout + result.stderr
        assert named in message, (what, message)
        assert "Traceback" not in message, (what, message)
        restore = conveyor_cli(
            "artifact-store",
            "update",
            "s3",
            "--bucket",
            s3_bucket.bucket,
            "--endpoint-url",
            s3_bucket.endpoint,
        )
        assert restore.returncode == 0, restore.stderr

    assert worker.proc.poll() is None, worker.output()
    result = team.run()
    assert result.returncode == 0, result.stdout + result.stderr + worker.output()[-3000:]


def test_refused_credentials_fail_the_submit_with_a_clear_error(
    vhost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    pipeline_file = client_dir / "team_pipeline.py"
    pipeline_file.write_text(PIPELINE.format(version=1, client_file=str(pipeline_file)))
    with auth_server() as server:
        asyncio.run(register_s3_stack(vhost, S3Bucket(server.endpoint, server.bucket)))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        result = conveyor_cli("pipeline", "run", "team_pipeline.py:scale_out", cwd=client_dir)
    message = result.stdout + result.stderr
    assert result.returncode == 1, message
    assert server.bucket in message and server.endpoint in message, message
    assert "refused" in message and "Traceback" not in message, message
    assert "not-the-secret" not in message
    with Client() as client:
        assert client.list_runs() == []
