"""Runs from a laptop through a team's server: compiled on the laptop, code uploaded, run on
a shared rabbitmq + s3 stack by the server's controller and workers, followed live, listed,
logged and loaded through the server; hostile uploads and specs refused, nothing run.

One server per module (with its controller and worker), as CI's budget asks.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conveyor.contracts import ComponentType
from conveyor.service.context import Services
from conveyor.workers import digests
from tests.conftest import ROOT, conveyor_cli, rabbitmq_available, running_server
from tests.integration.cli_helpers import ADMIN_TOKEN
from tests.integration.rabbitmq_support import Processes, fresh_vhost, wait_until
from tests.s3_support import TEST_KEY, TEST_REGION, TEST_SECRET, moto_server, new_bucket

pytestmark = pytest.mark.rabbitmq

STACK = "team"
MAX_CODE_MB = 1

FAILING = """
from conveyor import pipeline, step

BROKEN = {broken}


@step
def prepare() -> int:
    print("prepared 20 rows")
    return 20


@step
def finish(x: int) -> int:
    if BROKEN:
        raise ValueError("the data is bad")
    return x + 1


@pipeline
def flaky() -> None:
    finish(prepare())
"""


@dataclass
class Team:
    url: str
    tmp: Path
    server_home: Path
    processes: Processes

    def cli(self, home: Path, *args: str, cwd: Path | None = None):  # type: ignore[no-untyped-def]
        """``conveyor`` as a user runs it in ``home``, from ``cwd`` (not the server's)."""
        env = {"CONVEYOR_HOME": str(home), "CONVEYOR_SERVER_TOKEN": ""}
        return conveyor_cli(*args, cwd=cwd or self.tmp / "laptop-cwd", env=env, timeout=180)

    def ok(self, home: Path, *args: str, cwd: Path | None = None) -> str:
        done = self.cli(home, *args, cwd=cwd)
        assert done.returncode == 0, (args, done.stdout, done.stderr, self.processes.dump())
        return done.stdout

    def user(self, name: str) -> tuple[Path, str]:
        """A member ``name`` logged in from a home of their own (no store there); its token."""
        admin = self.tmp / "admin"
        token = self.ok(admin, "user", "create", name).strip()
        home = self.tmp / name
        self.ok(home, "login", self.url, "--token", token)
        return home, token


async def _shared_stack(server_home: Path, amqp: str, endpoint: str, bucket: str) -> None:
    services = await Services.open(server_home)
    try:
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "rmq", "rabbitmq", {"url": amqp, "concurrency": 2}, True
        )
        s3 = {
            "bucket": bucket,
            "endpoint_url": endpoint,
            "prefix": "team",
            "region": TEST_REGION,
            "access_key_id": TEST_KEY,
            "secret_access_key": TEST_SECRET,
        }
        await services.stacks.register_component(ComponentType.ARTIFACT_STORE, "s3", "s3", s3, True)
        await services.stacks.register_stack(
            STACK,
            {ComponentType.ORCHESTRATOR: "rmq", ComponentType.ARTIFACT_STORE: "s3"},
            False,
            True,
        )
    finally:
        await services.close()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    if not rabbitmq_available():
        pytest.skip("RabbitMQ does not answer on 127.0.0.1:5672")
    from tests.conftest import RABBITMQ_URL

    tmp = tmp_path_factory.mktemp("team-runs")
    server_home = tmp / "server-home"
    (tmp / "laptop-cwd").mkdir()
    with moto_server() as endpoint, fresh_vhost(RABBITMQ_URL) as amqp:
        asyncio.run(_shared_stack(server_home, amqp, endpoint, new_bucket(endpoint)))
        env = {
            "CONVEYOR_HOME": str(server_home),
            "CONVEYOR_ADMIN_TOKEN": ADMIN_TOKEN,
            "CONVEYOR_SERVER_TOKEN": "",
        }
        processes = Processes(tmp)
        try:
            with running_server(tmp / "logs", "--max-code-mb", str(MAX_CODE_MB), env=env) as server:
                processes.start("controller", "controller", "start", "--stack", STACK, env=env)
                processes.started[-1].wait_for_log("controller started")
                processes.start("worker", "worker", "start", "--stack", STACK, env=env)
                processes.started[-1].wait_for_log("worker started")
                made = Team(server.url, tmp, server_home, processes)
                made.ok(tmp / "admin", "login", server.url, "--token", ADMIN_TOKEN)
                yield made
        finally:
            processes.stop_all()


def _client_dir(team: Team, name: str) -> Path:
    """A folder of the laptop with a copy of the quickstart: the server never sees it."""
    folder = team.tmp / f"{name}-project"
    (folder / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "quickstart.py", folder / "examples" / "quickstart.py")
    return folder


def test_a_laptop_runs_the_quickstart_through_the_server(
    team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, _ = team.user("alice")
    project = _client_dir(team, "alice")
    team.ok(alice, "stack", "set", STACK)
    done = team.cli(
        alice,
        "pipeline",
        "run",
        "examples/quickstart.py:training_pipeline",
        "-p",
        "epochs=2",
        cwd=project,
    )
    assert done.returncode == 0, (done.stdout, done.stderr, team.processes.dump())
    # Followed live: a line per step, as on a local store, then the outputs and outcome.
    for step in ("make_dataset", "split", "train", "evaluate"):
        assert f"completed {step}" in " ".join(done.stderr.split()), done.stderr
    assert f"on stack '{STACK}' as run" in " ".join(done.stderr.split())
    assert 'evaluate.output = {"accuracy":' in done.stdout, done.stdout
    run_id = done.stdout.split("Run ", 1)[1].split()[0]
    assert f"Run {run_id} completed in" in done.stdout
    # Listed with its user, its logs read, its output loaded: all through the server.
    listed = team.ok(alice, "run", "list", "--user", "alice")
    assert run_id in listed and "alice" in listed and "completed" in listed
    team.cli(alice, "run", "logs", run_id).check_returncode()
    assert not (alice / "conveyor.db").exists()

    monkeypatch.setenv("CONVEYOR_HOME", str(alice))
    monkeypatch.chdir(project)
    from conveyor.service.client import Client
    from conveyor.service.remote_client import RemoteClient

    with Client() as client:
        assert isinstance(client, RemoteClient)
        run = client.get_run(run_id)
        assert run.user == "alice" and run.stack_name == STACK
        evaluation = next(
            a for a in client.list_artifacts(run_id=run_id) if a.step_name == "evaluate"
        )
        assert 0.0 <= client.load_artifact(evaluation.id)["accuracy"] <= 1.0

    # The Python call of a pipeline goes through the server too.
    from conveyor.service.pipelines import load_pipeline

    pipeline = load_pipeline("examples/quickstart.py:training_pipeline")
    handle = pipeline(epochs=2)
    assert handle.status.value == "completed"
    assert set(handle.load("evaluate")) == {"accuracy", "log_loss"}
    assert not (alice / "conveyor.db").exists()


def test_a_failing_step_fails_the_command_and_a_retry_runs_the_fixed_code(team: Team) -> None:
    carol, _ = team.user("carol")
    project = team.tmp / "carol-project"
    project.mkdir()
    (project / "flaky.py").write_text(FAILING.format(broken=True))
    done = team.cli(carol, "pipeline", "run", "flaky.py:flaky", "--stack", STACK, cwd=project)
    assert done.returncode == 1, (done.stdout, done.stderr)
    # What a step printed on the server shows here once it is done, as on a local store.
    assert "prepared 20 rows" in done.stdout, done.stdout
    assert "Step 'finish' failed: ValueError: the data is bad" in " ".join(done.stderr.split())
    assert "Traceback" in done.stderr and 'raise ValueError("the data is bad")' in done.stderr
    run_id = done.stdout.split("Run ", 1)[1].split()[0]
    assert f"Run {run_id} failed" in done.stdout

    (project / "flaky.py").write_text(FAILING.format(broken=False))
    # From another folder: the pipeline is compiled where the run was submitted.
    retried = team.cli(carol, "run", "retry", run_id, cwd=team.tmp)
    assert retried.returncode == 0, (retried.stdout, retried.stderr)
    assert "cached" in retried.stderr and "completed finish" in " ".join(retried.stderr.split())
    assert "finish.output = 21" in retried.stdout


def test_client_retry_run_through_the_server_reuses_completed_steps_for_the_retrier(
    team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.contracts import NotAllowed, RunStatus, StepStatus
    from conveyor.service.client import Client
    from conveyor.service.remote_client import RemoteClient

    ivan, _ = team.user("ivan")
    judy, _ = team.user("judy")
    project = team.tmp / "ivan-project"
    project.mkdir()
    # Steps of their own (carol's run above cached the same code): 30, not 20.
    own = FAILING.replace("return 20", "return 30")
    (project / "flaky_retry.py").write_text(own.format(broken=True))
    done = team.cli(ivan, "pipeline", "run", "flaky_retry.py:flaky", "--stack", STACK, cwd=project)
    assert done.returncode == 1, (done.stdout, done.stderr)
    failed = done.stdout.split("Run ", 1)[1].split()[0]
    (project / "flaky_retry.py").write_text(own.format(broken=False))
    monkeypatch.chdir(project)

    # Another member may read the run, not retry it.
    monkeypatch.setenv("CONVEYOR_HOME", str(judy))
    with Client() as client, pytest.raises(NotAllowed):
        client.retry_run(failed)
    # An admin's retry, through the Python API of a logged-in home: it is the admin's.
    monkeypatch.setenv("CONVEYOR_HOME", str(team.tmp / "admin"))
    with Client() as client:
        assert isinstance(client, RemoteClient)
        handle = client.retry_run(failed)
        assert handle.status is RunStatus.COMPLETED
        retry = client.get_run(handle.id)
        assert (retry.retry_of, retry.user, retry.stack_name) == (failed, "default", STACK)
        original = client.get_run(failed)
        assert (original.user, original.retried_by) == ("ivan", [retry.id])
        steps = {s.name: s for s in client.get_steps(retry.id)}
        assert steps["prepare"].status is StepStatus.CACHED
        assert steps["prepare"].cached_from == failed, "the completed step is reused"
        assert steps["finish"].status is StepStatus.COMPLETED, "the failed one runs again"
        assert handle.load("finish") == 31


SLOW = """
import asyncio

from conveyor import pipeline, step


@step
def prepare() -> int:
    return 1


@step
async def wait_long(x: int) -> int:
    await asyncio.sleep(120)
    return x


@pipeline
def slow() -> None:
    wait_long(prepare())
"""


def test_ctrl_c_cancels_the_run_on_the_server(team: Team) -> None:
    grace, _ = team.user("grace")
    project = team.tmp / "grace-project"
    project.mkdir()
    (project / "slow.py").write_text(SLOW)
    env = {**os.environ, "CONVEYOR_HOME": str(grace), "CONVEYOR_SERVER_TOKEN": ""}
    command = [sys.executable, "-m", "conveyor.service.cli.app", "pipeline", "run", "slow.py:slow"]
    stderr = project / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*command, "--stack", STACK], cwd=project, env=env, stdout=subprocess.PIPE, stderr=err
        )
    try:
        wait_until(lambda: "as run" in stderr.read_text(), "the run to start")
        run_id = stderr.read_text().split("as run ", 1)[1].split()[0]
        # Followed live: the first step's line comes while the run goes on.
        wait_until(lambda: "completed prepare" in stderr.read_text(), "the first step's line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert f"Interrupted: cancelling run {run_id}" in stderr.read_text()
    described = " ".join(team.ok(grace, "run", "describe", run_id).split())
    assert "submitted by grace: cancelled" in described, described


def _zip(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def _spec(code: dict[str, object] | None, ref: str = "flow.py:work") -> dict[str, object]:
    step: dict[str, object] = {"name": "work", "ref": ref}
    if code is not None:
        step["code"] = code
    return {"name": "hostile", "steps": [step]}


def test_hostile_uploads_and_specs_are_refused_and_nothing_runs(team: Team) -> None:
    _, token = team.user("dave")
    eve, _ = team.user("eve")
    # Eve's private stack, which Dave may not see, let alone use.
    team.ok(eve, "orchestrator", "register", "eve-o", "--flavor", "local")
    team.ok(
        eve,
        "artifact-store",
        "register",
        "eve-a",
        "--flavor",
        "local",
        f"--path={team.tmp / 'eve'}",
    )
    team.ok(eve, "stack", "register", "eve-private", "-o", "eve-o", "-a", "eve-a")

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=team.url, headers=headers, timeout=60) as api:
        good = _zip({"flow.py": b"from conveyor import step\n"})
        digest = digests.of_bytes(good)

        def put(name: str, body: bytes, stack: str = STACK) -> httpx.Response:
            return api.put(f"/api/code/{name}", params={"stack": stack}, content=body)

        cut = put(digest, good[:-10])
        assert cut.status_code == 422 and "digest" in cut.json()["message"]
        assert put("sha256:" + "0" * 64, good).status_code == 422
        assert put("..%2F..%2Fetc", good).status_code in (404, 422)
        climbing = _zip({"../evil.py": b"print('out')"})
        escape = put(digests.of_bytes(climbing), climbing)
        assert escape.status_code == 422 and "climbs out" in escape.json()["message"]
        not_zip = b"just text"
        assert put(digests.of_bytes(not_zip), not_zip).status_code == 422
        huge = os.urandom(MAX_CODE_MB * (1 << 20) + 1)
        too_large = put(digests.of_bytes(huge), huge)
        assert too_large.status_code == 413 and "--max-code-mb" in too_large.json()["message"]
        assert put(digest, good, stack="eve-private").status_code == 404

        stored = put(digest, good)
        assert stored.status_code == 200, stored.text
        assert put(digest, good).json() == stored.json()  # idempotent
        known = api.get(f"/api/code/{digest}", params={"stack": STACK})
        assert known.status_code == 200 and known.json() == stored.json()
        unknown = "blake3:" + "2" * 64
        assert api.get(f"/api/code/{unknown}", params={"stack": STACK}).status_code == 404

        def submit(spec: dict[str, object], stack: str = STACK) -> httpx.Response:
            return api.post("/api/runs", json={"spec": spec, "stack": stack})

        missing = dict(stored.json(), digest="blake3:" + "1" * 64)
        refused = submit(_spec(missing))
        assert refused.status_code == 422 and "does not hold" in refused.json()["message"]
        untrusted = submit(_spec(None, ref="os:system"))
        assert untrusted.status_code == 403 and "trust" in untrusted.json()["message"]
        assert submit(_spec(None)).status_code == 403  # a file without its archive
        outside = submit(_spec(stored.json(), ref="../flow.py:work"))
        assert outside.status_code == 422
        assert submit(_spec(stored.json()), stack="eve-private").status_code == 404
        both = api.post("/api/runs", json={"spec": _spec(stored.json()), "pipeline": "a.py:b"})
        assert both.status_code == 422
        future = api.post(
            "/api/runs",
            json={"spec": _spec(stored.json()), "stack": STACK},
            headers={"User-Agent": "conveyor/999.0.0"},
        )
        assert future.status_code == 422 and "major versions differ" in future.json()["message"]
        assert api.get("/api/runs", params={"user": "dave"}).json()["items"] == []

        # A good spec runs once per idempotency key, as a pipeline reference does.
        real = _zip(
            {"flow.py": b"from conveyor import step\n\n@step\ndef work() -> int:\n    return 1\n"}
        )
        code = put(digests.of_bytes(real), real).json()
        body = {"spec": _spec(code), "stack": STACK, "cache": False}
        first = api.post("/api/runs", json=body, headers={"Idempotency-Key": "dave-1"})
        again = api.post("/api/runs", json=body, headers={"Idempotency-Key": "dave-1"})
        assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
        assert first.json()["id"] == again.json()["id"] and first.json()["user"] == "dave"


def test_a_server_of_another_major_version_is_told_apart(
    team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    frank, _ = team.user("frank")
    monkeypatch.setenv("CONVEYOR_HOME", str(frank))
    monkeypatch.setattr("conveyor.service.remote_runs.conveyor_version", lambda: "999.0.0")
    from conveyor.contracts import ConveyorError
    from conveyor.service.pipelines import load_pipeline

    pipeline = load_pipeline(f"{ROOT / 'examples' / 'quickstart.py'}:training_pipeline")
    with pytest.raises(ConveyorError, match="major versions differ"):
        pipeline(epochs=2)
    # Conveyor embeds an engine on the home's own store: a logged-in home says what to use.
    from conveyor.service.engine import Conveyor

    with pytest.raises(ConveyorError, match="embeds an engine on this home's own store"):
        asyncio.run(Conveyor().start())
    assert not (frank / "conveyor.db").exists()


def test_a_server_older_than_its_client_says_so_when_it_refuses_a_newer_field(
    team: Team, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A laptop upgraded before its team's server sends a spec with a field the server's
    release does not know: the refusal names the field, and now the releases too, and which
    to upgrade (a client as old as its server gets the server's message alone)."""
    heidi, _ = team.user("heidi")
    monkeypatch.setenv("CONVEYOR_HOME", str(heidi))
    monkeypatch.setenv("CONVEYOR_STACK", STACK)
    from conveyor.contracts import ValidationError
    from conveyor.service.pipelines import load_pipeline
    from conveyor.service.remote_client import RemoteClient
    from conveyor.service.version import conveyor_version

    server = conveyor_version()
    plain = RemoteClient.request

    def newer_spec(self: RemoteClient, method: str, path: str, **options: object) -> httpx.Response:
        body = options.get("json")
        if path == "/api/runs" and isinstance(body, dict):
            body["spec"]["placement"] = "eu-west"  # a field of a later release
        return plain(self, method, path, **options)

    monkeypatch.setattr(RemoteClient, "request", newer_spec)
    pipeline = load_pipeline(f"{ROOT / 'examples' / 'quickstart.py'}:training_pipeline")
    with pytest.raises(ValidationError) as same:
        pipeline(epochs=2)
    assert "placement" in str(same.value) and "this client" not in str(same.value)

    newer = f"{server.split('.')[0]}.999.0"  # the same major version, a later release
    monkeypatch.setattr("conveyor.service.remote_runs.conveyor_version", lambda: newer)
    with pytest.raises(ValidationError) as told:
        pipeline(epochs=2)
    error = str(told.value)
    assert "placement" in error, error
    assert f"the server runs Conveyor {server} and this client Conveyor {newer}" in error
    assert f"upgrade the server to Conveyor {newer}" in error
