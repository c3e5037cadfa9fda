"""Every code block of the README runs as written.

Each block is found by its first line and run the way a reader would run it: shell lines
through bash with the installed ``conveyor`` on the PATH, Python blocks as scripts. Only what a
test machine needs is substituted, and each substitution is named where it is made: the
broker URL gets a virtual host of the test's own, a path under ``/srv`` a temporary folder,
the server's port a free one, and ``RUN_ID`` the id of the run the block started. A new block
fails ``test_every_block_is_run_by_a_test`` until a test runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import RABBITMQ_URL, ROOT
from tests.integration.rabbitmq_support import vhost
from tests.subprocesses import free_port, stop, wait_until_answers

__all__ = ["vhost"]  # a fixture

README = (ROOT / "README.md").read_text()
BLOCKS = [
    (match.group(2), match.group(3))
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", README, re.S | re.M)
]
BIN = str(Path(sys.executable).parent)  # where pip put the `conveyor` command
SERVER_PORT = "8237"

# The first line of each block, and the test that runs it.
CHECKED = {
    "pip install -e . && conveyor pipeline run examples/quickstart.py:training_pipeline": (
        "test_the_first_commands_install_and_run_the_example"
    ),
    "from conveyor import pipeline, step": "test_the_tour_runs",
    "conveyor pipeline run examples/quickstart.py:training_pipeline -p epochs=100": (
        "test_the_command_line_tour_runs"
    ),
    "from conveyor import Client": "test_the_client_example_runs",
    "import asyncio": "test_the_embedding_example_runs",
    "conveyor orchestrator register rmq": "test_the_rabbitmq_stack_and_a_plain_aio_pika_request",
    "import asyncio\nimport json": "test_the_rabbitmq_stack_and_a_plain_aio_pika_request",
    "conveyor server up": "test_the_server_answers_the_curl_example",
    "curl -X POST": "test_the_server_answers_the_curl_example",
    "python benchmarks/overhead.py": "test_the_benchmark_command_runs",
    "pip install -e '.[dev]'": "test_the_development_checks_are_what_ci_runs",
}


def block(first_line: str) -> str:
    """The one README block that starts with ``first_line`` (indentation removed)."""
    found = [text for _, text in BLOCKS if _dedent(text).startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README blocks start with {first_line!r}"
    return _dedent(found[0])


def _dedent(text: str) -> str:
    return textwrap.dedent(text)


def commands(text: str) -> list[str]:
    """A shell block's commands: comments and `[optional]` arguments left out."""
    lines = (re.sub(r"\s+#.*$", "", line) for line in text.splitlines())
    return [re.sub(r"\s+\[-[^]]*\]", "", line).strip() for line in lines if line.strip()]


def sh(command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one README command from the repository's root, as a reader would: without the
    asyncio debug mode that the tests' own process runs in (it doubles the benchmark's
    per-step overhead, and a reader's figures are made without it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env={**env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(command: str, *, timeout: float = 120) -> str:
    result = sh(command, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_python(text: str, tmp_path: Path, name: str) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def newest_run_id() -> str:
    runs = json.loads(ok("conveyor run list --output json"))
    return str(runs[0]["id"])


def run_status(run_id: str) -> str | None:
    """The run's status, or None while the controller has not recorded it yet."""
    runs = json.loads(ok("conveyor run list --output json"))
    return next((str(run["status"]) for run in runs if run["id"] == run_id), None)


def test_every_block_is_run_by_a_test() -> None:
    firsts = {_dedent(text) for _, text in BLOCKS}
    unchecked = [text for text in firsts if not any(text.startswith(k) for k in CHECKED)]
    assert not unchecked, f"README blocks that no test runs: {unchecked}"
    assert set(CHECKED.values()) <= set(globals()), "a test named in CHECKED does not exist"


def test_the_first_commands_install_and_run_the_example() -> None:
    first = commands(block("pip install -e . && conveyor"))
    assert first == [
        "pip install -e . && conveyor pipeline run examples/quickstart.py:training_pipeline",
        "pip install -q -e '.[dev]' && python -m pytest",
    ]
    # The installs are what CI itself has just done, and pytest is running this test.
    out = ok(first[0].removeprefix("pip install -e . && "))
    assert "completed" in out
    assert json.loads(ok("conveyor run list --output json"))[0]["status"] == "completed"


def test_the_tour_runs(tmp_path: Path) -> None:
    out = run_python(block("from conveyor import pipeline, step"), tmp_path, "tour")
    assert out.strip() == "completed 90"


def test_the_command_line_tour_runs() -> None:
    first, *rest = commands(block("conveyor pipeline run examples/quickstart.py"))
    ok(first)
    run_id = newest_run_id()
    outputs = {}
    for command in rest:
        command = command.replace("RUN_ID", run_id)
        if command.startswith("conveyor run cancel"):
            refused = sh(command)  # the run has finished: the refusal says so
            assert refused.returncode == 1
            assert "completed already" in refused.stderr
            continue
        if command.startswith("conveyor run retry"):
            refused = sh(command)  # the run completed: there is nothing to retry
            assert refused.returncode == 1
            assert "completed, there is nothing to retry" in refused.stderr
            continue
        outputs[command.split()[1] + " " + command.split()[2]] = ok(command)
    assert run_id in outputs["run list"]
    assert "evaluate" in outputs["run describe"]
    assert "evaluate" in outputs["artifact list"]
    assert "default" in outputs["stack describe"]


def test_the_client_example_runs(tmp_path: Path) -> None:
    failed = sh("conveyor pipeline run tests/pipelines/cli_pipelines.py:failing")
    assert failed.returncode == 1, failed.stdout
    run_id = newest_run_id()
    out = run_python(block("from conveyor import Client"), tmp_path, "client").splitlines()
    first, stacks = out
    assert first.startswith(f"{run_id} failing [('explode', ") and "no such column" in first
    assert stacks == "['default']"


def test_the_embedding_example_runs(tmp_path: Path) -> None:
    assert run_python(block("import asyncio\n\nfrom conveyor"), tmp_path, "embed").strip() == (
        "completed 14"
    )


@contextmanager
def background(command: str, logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    with logs.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=ROOT,
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        stop(process)


def test_the_rabbitmq_stack_and_a_plain_aio_pika_request(vhost: str, tmp_path: Path) -> None:
    def local(text: str) -> str:  # the test's own virtual host and artifact folder
        return text.replace(RABBITMQ_URL, vhost).replace("/srv/conveyor", str(tmp_path))

    setup, controller, worker, run = _rabbitmq_commands(local(block("conveyor orchestrator")))
    for command in setup:
        ok(command)
    with (
        background(controller, tmp_path / "controller.log"),
        background(worker, tmp_path / "worker.log"),
    ):
        assert "completed" in ok(run, timeout=180)
        request = local(block("import asyncio\nimport json"))
        run_id = run_python(request, tmp_path, "request").strip()
        deadline = time.monotonic() + 120
        while run_status(run_id) != "completed":
            assert time.monotonic() < deadline, (tmp_path / "controller.log").read_text()
            time.sleep(0.5)


def _rabbitmq_commands(text: str) -> tuple[list[str], str, str, str]:
    lines = commands(text)
    [controller] = [c for c in lines if c.startswith("conveyor controller start")]
    [worker] = [c for c in lines if c.startswith("conveyor worker start")]
    setup = lines[: lines.index(controller)]
    [run] = lines[lines.index(worker) + 1 :]
    return setup, controller, worker, run


def test_the_server_answers_the_curl_example(tmp_path: Path) -> None:
    up, with_options = commands(block("conveyor server up"))
    assert "--pipelines" in ok("conveyor server up --help")  # the second line's options exist
    assert with_options.startswith("conveyor server up --pipelines")
    port = str(free_port())  # 8237 may be taken on a test machine
    with background(f"{up} --port {port}", tmp_path / "server.log") as server:
        base = f"http://127.0.0.1:{port}"
        wait_until_answers(f"{base}/healthz", server, (tmp_path / "server.log").read_text, 60)
        curl = " ".join(block("curl -X POST").replace("\\\n", " ").split())
        curl = curl.replace(SERVER_PORT, port) + " -s -i"
        first, again = sh(curl), sh(curl)
        assert " 201" in first.stdout.splitlines()[0] or " 200" in first.stdout.splitlines()[0]
        assert "idempotent-replayed: true" in again.stdout.lower()
        assert _body(first.stdout)["id"] == _body(again.stdout)["id"]


def _body(response: str) -> dict[str, object]:
    body: dict[str, object] = json.loads(response.split("\n\n", 1)[1])
    return body


def test_the_benchmark_command_runs() -> None:
    [command] = commands(block("python benchmarks/overhead.py"))
    # One round each (the figures are not what this checks), with --json as the README offers.
    run = command.replace("python ", f"{sys.executable} ", 1) + " --json --repeat 1"
    lines = [json.loads(line) for line in ok(run, timeout=300).splitlines()]
    assert [line["workload"] for line in lines] == [
        "chain_200",
        "fanout_1000",
        "fanout_1000_cached",
        "concurrent_runs",
    ]
    assert all(line["peak_rss_mb"] > 0 and line["overhead_ms_per_step"] > 0 for line in lines)
    assert lines[-1]["p50_s"] <= lines[-1]["makespan_s"]


def test_the_development_checks_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    install, checks = commands(block("pip install -e '.[dev]'"))
    assert install.replace("pip install", "python -m pip install -q") in ci
    for check in checks.split(" && "):
        assert check.replace("scripts/typecheck", "PYTHON=python scripts/typecheck") in ci


def test_the_docs_link_only_to_files_in_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT.resolve()), f"{page.name} -> {target}"
            assert resolved.exists(), f"{page.name} links to a missing {target}"


def test_the_architecture_lists_every_module() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        path.relative_to(ROOT).as_posix()
        for folder in ("contracts", "workers", "service")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "__init__.py"
    ]
    missing = [module for module in modules if f"`{module}`" not in architecture]
    assert not missing, f"docs/architecture.md's module map misses {missing}"
