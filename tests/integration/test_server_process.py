"""``conveyor server up`` as a user starts it: a process that serves, runs, and stops cleanly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from conveyor.service.bind_checks import TOKEN_ENV
from tests.conftest import ROOT, conveyor_cli, free_port, running_server

GATED = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:gated_pipeline"


def test_server_up_serves_the_dashboard_runs_pipelines_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    with running_server(tmp_path / "logs") as server:
        # The banner names the port it listens on, after the admin's token that a first start
        # prints once; stdout stays empty.
        port = server.url.rsplit(":", 1)[1]
        said = server.stderr.read_text().splitlines()
        banner = next(line for line in said if line.startswith("Conveyor server on"))
        assert banner.startswith(f"Conveyor server on http://127.0.0.1:{port} ")
        assert server.stdout.read_text() == ""

        page = httpx.get(f"{server.url}/", timeout=10)
        assert page.status_code == 200
        assert "STACK NAME" in page.text and "default" in page.text
        health = httpx.get(f"{server.url}/healthz", timeout=10).json()
        assert health["checks"]["controller"]["ok"] is True

        # The server runs the default stack's controller and workers: a run completes.
        submitted = httpx.post(
            f"{server.url}/api/runs", json={"pipeline": GATED, "parameters": {"n": 3}}, timeout=30
        )
        assert submitted.status_code == 201, submitted.text
        run_id = submitted.json()["id"]
        deadline = time.monotonic() + 30
        while (status := httpx.get(f"{server.url}/api/runs/{run_id}").json()["status"]) not in (
            "completed",
            "failed",
        ):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert status == "completed"

        assert server.stop() == 0, server.output()
    assert "Traceback" not in server.stderr.read_text(), server.output()
    assert "Conveyor server stopped" in server.stderr.read_text()
    # Nothing listens any more.
    try:
        httpx.get(f"{server.url}/healthz", timeout=2)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError("the server still answers after SIGTERM")


def test_server_up_refuses_a_public_address_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    result = conveyor_cli(
        "server", "up", "--host", "0.0.0.0", "--port", str(free_port()), env=env, timeout=60
    )
    assert result.returncode == 1, result
    assert TOKEN_ENV in result.stderr and "0.0.0.0" in result.stderr


def test_server_up_refuses_an_unknown_stack() -> None:
    result = conveyor_cli("server", "up", "--stack", "nope", "--port", str(free_port()))
    assert result.returncode == 1
    assert "no stack named 'nope'" in result.stderr
