"""Limits that keep one client from stopping the server: the size of a compiled DAG (off the
event loop), which pipelines a request may name, the token's length, login attempts."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conveyor.contracts import ConflictError
from conveyor.service.api import create_app
from conveyor.service.bind_checks import TOKEN_ENV
from tests.conftest import ROOT, conveyor_cli, free_port, running_server
from tests.integration.api_helpers import BASE_URL, TOKEN, assert_error, serving, wait_status

DEMO = ROOT / "tests" / "pipelines" / "server_demo.py"
FAN_OUT = f"{DEMO}:fan_out_pipeline"


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_huge_fan_out_is_refused_and_healthz_answers_while_it_compiles(
    tmp_path: Path,
) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    parameters = {"width": 1_000_000, "started": str(started), "gate": str(gate)}
    with running_server(tmp_path / "logs") as server, ThreadPoolExecutor(1) as pool:
        try:
            submitted = pool.submit(
                httpx.post,
                f"{server.url}/api/runs",
                json={"pipeline": FAN_OUT, "parameters": parameters},
                timeout=60,
            )
            _wait_for(started)
            # The pipeline function is running (held at its gate): the server still answers.
            health = httpx.get(f"{server.url}/healthz", timeout=10)
            assert health.status_code == 200, health.text
            assert not submitted.done()
        finally:
            gate.touch()
        response = submitted.result(timeout=60)
        assert_error(response, 413, "more than 10000 steps", "--max-steps")
        small = httpx.post(
            f"{server.url}/api/runs",
            json={"pipeline": FAN_OUT, "parameters": {"width": 3}},
            timeout=60,
        )
        assert small.status_code == 201, small.text
        assert server.stop() == 0, server.output()


async def test_the_step_limit_is_the_servers_to_set(home: Path) -> None:
    async with serving(home, max_steps=5) as (_, api):
        body = {"pipeline": FAN_OUT, "parameters": {"width": 6}}
        assert_error(await api.post("/api/runs", json=body), 413, "more than 5 steps")
        body["parameters"] = {"width": 5}
        response = await api.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        await wait_status(api, response.json()["id"])


# --- which pipelines a request may name ---


async def test_only_files_of_the_pipelines_folder_and_trusted_packages_are_compiled(
    home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "pipelines"
    (folder / "team").mkdir(parents=True)
    shutil.copy(DEMO, folder / "team" / "demo.py")
    marker = tmp_path / "imported"
    outside = tmp_path / "outside.py"
    outside.write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "link.py").symlink_to(outside)
    (folder / ".hidden").mkdir()
    shutil.copy(outside, folder / ".hidden" / "x.py")

    async with serving(home, pipelines=folder, trusted_packages=["tests"]) as (_, api):
        allowed = [
            "team/demo.py:fan_out_pipeline",  # relative to the pipelines folder
            f"{folder}/team/demo.py:fan_out_pipeline",
            "tests.pipelines.server_demo:fan_out_pipeline",  # a trusted package
        ]
        for ref in allowed:
            response = await api.post("/api/runs", json={"pipeline": ref})
            assert response.status_code == 201, (ref, response.text)
            await wait_status(api, response.json()["id"])
        refused = [
            f"{outside}:p",
            "link.py:p",
            "../outside.py:p",
            "team/../../outside.py:p",
            ".hidden/x.py:p",
            "/etc/passwd.py:p",
            "os:system",
            "subprocess:run",
            "conveyor.service.pipelines:pipeline",
            "tests_evil.x:p",
        ]
        for ref in refused:
            response = await api.post("/api/runs", json={"pipeline": ref})
            assert response.status_code in (403, 422), (ref, response.text)
            message = response.json()["message"]
            assert "--pipelines" in message or "--trust" in message or "reference" in message
        assert not marker.exists(), "a refused reference was imported"


# --- tokens ---


def test_server_up_refuses_a_short_token() -> None:
    result = conveyor_cli(
        "server", "up", "--port", str(free_port()), env={TOKEN_ENV: "abc"}, timeout=30
    )
    assert result.returncode == 1, result
    assert TOKEN_ENV in result.stderr and "at least 16 characters" in result.stderr
    assert "abc" not in result.stderr.replace(TOKEN_ENV, "")


def test_an_app_with_a_short_token_is_never_made(home: Path) -> None:
    with pytest.raises(ConflictError, match="at least 16 characters"):
        create_app(home, token="x")


# --- login attempts ---


async def test_login_attempts_are_limited_per_client_address(home: Path) -> None:
    app = create_app(home, token=TOKEN)

    def client(address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url=BASE_URL)

    async with (
        app.router.lifespan_context(app),
        client("192.0.2.1") as guesser,
        client("192.0.2.2") as user,
    ):
        answers = []
        for _ in range(30):
            response = await guesser.post("/login", data={"token": "guess"})
            answers.append(response.status_code)
            if response.status_code == 429:
                break
        assert answers[-1] == 429 and set(answers[:-1]) == {401}, answers
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "attempts" in response.text
        # Even the right token waits: a guesser must not learn it was right.
        late = await guesser.post("/login", data={"token": TOKEN})
        assert late.status_code == 429
        # Someone else logs in as usual.
        ok = await user.post("/login", data={"token": TOKEN})
        assert ok.status_code == 303, ok.text
