"""The HTTP API's security: the token, paths outside the artifact store, secrets, bugs."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import httpx
import pytest
from structlog.testing import capture_logs

from conveyor.contracts import PipelineSpec, StepSpec, new_id, utcnow
from conveyor.service.api import create_app
from conveyor.service.api.security import SESSION_SECRET_FILE
from conveyor.service.context import Services
from conveyor.service.store import Writes
from conveyor.service.store.summaries import RunSummaries
from tests.integration.api_helpers import (
    BASE_URL,
    QUICKSTART,
    SECRET,
    TOKEN,
    assert_error,
    serving,
    submit,
    wait_status,
)


@pytest.fixture
async def api(home: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(home) as (_, client):
        yield client


# --- security ---


def _sample_path(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "orchestrator" if m[1] == "type" else "x", path)


async def test_with_a_token_every_api_route_needs_it(home: Path) -> None:
    async with serving(home, token=TOKEN) as (app, client):
        # Every route the OpenAPI document lists under /api, with every method.
        routes = [
            (method.upper(), path)
            for path, operations in app.openapi()["paths"].items()
            if path.startswith("/api/")
            for method in operations
        ]
        assert len(routes) > 25
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                response = await client.request(method, _sample_path(path), headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert TOKEN not in response.text
        assert (await client.get("/metrics")).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/api/stacks", headers=good)).status_code == 200
        assert (await client.get("/metrics", headers=good)).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        run = (await client.post("/api/runs", json={"pipeline": QUICKSTART}, headers=good)).json()

        page = await client.get("/stacks/default")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=/stacks/default"
        assert (await client.get(f"/ui/runs/{run['id']}/state")).status_code == 401
        form = await client.get("/login?next=/stacks/default")
        assert form.status_code == 200 and 'type="password"' in form.text
        wrong = await client.post("/login", data={"token": "nope", "next": "/stacks/default"})
        assert wrong.status_code == 401 and "conveyor_session" not in wrong.headers.get(
            "set-cookie", ""
        )
        ok = await client.post("/login", data={"token": TOKEN, "next": "/stacks/default"})
        assert ok.status_code == 303 and ok.headers["location"] == "/stacks/default"
        cookie = ok.headers["set-cookie"]
        assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert (await client.get("/stacks/default")).status_code == 200
        assert (await client.get(f"/ui/runs/{run['id']}/state")).status_code == 200
        # The cookie opens the dashboard, not the API.
        assert (await client.get("/api/stacks")).status_code == 401
        client.headers.update(good)
        await wait_status(client, run["id"])
        out = await client.post("/logout")
        assert out.status_code == 303


async def test_artifact_routes_never_leave_the_store(api: httpx.AsyncClient, home: Path) -> None:
    run = await submit(api, parameters={"epochs": 1})
    await wait_status(api, run["id"])
    root = home / "artifacts"
    outside = home / "outside.txt"
    outside.write_text("not an artifact")
    (root / "escape").symlink_to(outside)
    sneaky = {
        "absolute": "file:///etc/passwd",
        "dotdot": f"file://{root}/../outside.txt",
        "encoded": f"file://{root}/%2e%2e/outside.txt",
        "symlink": f"file://{root}/escape",
        "not-a-file": "http://example.com/x",
    }
    digest = "blake3:" + blake3.blake3(outside.read_bytes()).hexdigest()
    async with await Services.open(home) as services, services.db.transaction() as conn:
        for name, uri in sneaky.items():
            await conn.execute(
                "INSERT INTO artifacts (id, run_id, step_name, output_name, uri, digest, size,"
                " materializer, data_type, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    f"bad-{name}",
                    run["id"],
                    "evil",
                    name,
                    uri,
                    digest,
                    15,
                    "str",
                    "builtins.str",
                    utcnow().isoformat(),
                ),
            )
    for name in sneaky:
        for path in (
            f"/api/artifacts/bad-{name}/download",
            f"/api/artifacts/bad-{name}/preview",
            f"/artifacts/bad-{name}/download",
        ):
            response = await api.get(path)
            assert response.status_code == 403, (path, response.text)
            assert "not an artifact" not in response.text
    for path in (
        "/api/artifacts/..%2F..%2Fetc%2Fpasswd/download",
        "/api/artifacts/%2e%2e/download",
        "/artifacts/..%2F..%2Fetc%2Fpasswd/download",
        "/static/..%2F..%2Fapp.py",
        "/static/%2e%2e/%2e%2e/app.py",
    ):
        response = await api.get(path)
        assert response.status_code == 404, (path, response.status_code)
        assert "root:" not in response.text and "def create_app" not in response.text


async def test_secrets_never_appear_in_a_response_or_page(
    api: httpx.AsyncClient, home: Path
) -> None:
    url = f"amqp://conveyor:{SECRET}@127.0.0.1:5672/"
    body = {"type": "orchestrator", "name": "remote", "flavor": "rabbitmq", "config": {"url": url}}
    seen = [await api.post("/api/components", json=body)]
    assert seen[0].status_code == 201, seen[0].text
    seen.append(
        await api.post(
            "/api/components",
            json={**body, "name": "broken", "config": {"url": url, "concurrency": "many"}},
        )
    )
    assert seen[-1].status_code == 422
    stack = {
        "name": "remote",
        "components": {"orchestrator": "remote", "artifact_store": "default"},
    }
    seen.append(await api.post("/api/stacks", json=stack))
    assert seen[-1].status_code == 201
    # A run recorded on that stack keeps a snapshot of its configuration.
    async with await Services.open(home) as services:
        remote = await services.stacks.get("remote")
        spec = PipelineSpec(name="p", steps=[StepSpec(name="s", ref="m:s")])
        run_id = new_id()
        writes = Writes()
        services.runs.insert_run(
            writes,
            run_id=run_id,
            spec=spec,
            stack_id=remote.id,
            stack_name=remote.name,
            stack_snapshot=remote.model_dump(mode="json"),
            idempotency_key=None,
            owner=None,
            now=utcnow(),
        )
        await services.db.write(writes)
    assert SECRET in json.dumps(remote.model_dump(mode="json"))  # the test can fail
    for path in (
        "/api/stacks",
        "/api/stacks/remote",
        "/api/stacks/remote/export",
        "/api/stacks/remote/runs",
        "/api/components",
        "/api/components/orchestrator/remote",
        "/api/runs",
        f"/api/runs/{run_id}",
        "/",
        "/stacks/remote",
        f"/runs/{run_id}",
        f"/ui/runs/{run_id}/state",
    ):
        response = await api.get(path)
        assert response.status_code == 200, (path, response.text)
        seen.append(response)
    for response in seen:
        assert SECRET not in response.text, response.request.url


async def test_a_bug_is_a_json_500_without_its_details(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"password={SECRET}")

    monkeypatch.setattr(RunSummaries, "pipelines", broken)
    app = create_app(home)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            response = await c.get("/api/pipelines")
    assert_error(response, 500, "RuntimeError", "server's log")
    assert SECRET not in response.text


async def test_a_symlink_swapped_in_during_a_download_never_leaks(
    api: httpx.AsyncClient, home: Path, tmp_path: Path
) -> None:
    """A thread keeps swapping an artifact's file for a symlink to a secret and back, while
    the file is downloaded: each download is the artifact or a refusal, never the secret."""
    run = await submit(api, parameters={"epochs": 1})
    await wait_status(api, run["id"])
    artifact = (await api.get(f"/api/artifacts?run_id={run['id']}")).json()["items"][0]
    genuine = (await api.get(f"/api/artifacts/{artifact['id']}/download")).content
    path = Path(artifact["ref"]["uri"].removeprefix("file://"))
    secret = tmp_path / "passwd"
    secret.write_bytes(b"root:SECRET".ljust(len(genuine), b"!"))
    keep = tmp_path / "genuine"
    os.link(path, keep)
    stop = threading.Event()

    def swap() -> None:
        swapping = path.with_name("swap")
        while not stop.is_set():
            os.symlink(secret, swapping)
            os.replace(swapping, path)
            os.link(keep, swapping)
            os.replace(swapping, path)

    racer = threading.Thread(target=swap, daemon=True)
    racer.start()
    statuses: list[int] = []
    leaks = wrong = 0
    try:
        # Until the race was seen both ways (or 3,000 tries): how often a download meets the
        # link depends on how the threads are scheduled, which a loaded machine changes.
        for _ in range(1500):
            for route in ("/api/artifacts/{}/download", "/artifacts/{}/download"):
                response = await api.get(route.format(artifact["id"]))
                leaks += b"SECRET" in response.content
                statuses.append(response.status_code)
                wrong += response.status_code == 200 and response.content != genuine
            if len(statuses) >= 600 and {200, 403} <= set(statuses):
                break
    finally:
        stop.set()
        racer.join(10)
    assert leaks == 0, f"the secret leaked {leaks} times in {len(statuses)} downloads"
    assert wrong == 0
    assert set(statuses) == {200, 403}, sorted(set(statuses))  # both states were seen


async def test_a_dashboard_session_outlives_a_restart_not_a_rotated_token(home: Path) -> None:
    async with serving(home, token=TOKEN) as (_, client):
        ok = await client.post("/login", data={"token": TOKEN, "next": "/stacks/default"})
        assert ok.status_code == 303
        cookie = client.cookies["conveyor_session"]
    kept = home / SESSION_SECRET_FILE
    secret = kept.read_text().strip() if kept.exists() else None
    with capture_logs() as logs:
        async with serving(home, token=TOKEN) as (_, client):
            assert (await client.get("/stacks/default")).status_code == 303  # no cookie yet
            client.cookies.set("conveyor_session", cookie)
            page = await client.get("/stacks/default")
            assert page.status_code == 200, "the session of the server before ended"
            # A rotated token still ends the sessions it opened.
            good = {"Authorization": f"Bearer {TOKEN}"}
            rotated = await client.post("/api/users/default/rotate-token", headers=good)
            assert rotated.status_code == 200, rotated.text
            after = await client.get("/stacks/default")
            assert after.status_code == 303 and after.headers["location"].startswith("/login")
    # Kept in the server's home, for its user only, made once, never logged.
    assert secret is not None and kept.read_text().strip() == secret
    assert kept.stat().st_mode & 0o777 == 0o600
    assert secret not in repr(logs)
