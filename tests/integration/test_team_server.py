"""A team's server: ``conveyor server up`` in one home, users with their own tokens, private
and shared stacks, runs with their users, and tokens that never leak."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.service.bind_checks import ADMIN_TOKEN_ENV, TOKEN_ENV
from tests.conftest import ROOT, Server, conveyor_cli, running_server
from tests.integration.cli_helpers import cli

GATED = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:gated_pipeline"
ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.fixture
def server(tmp_path: Path, home: Path) -> Iterator[Server]:
    """A server whose admin token is given, so that every request needs a user's token."""
    env = {ADMIN_TOKEN_ENV: ADMIN_TOKEN, TOKEN_ENV: ""}
    with running_server(tmp_path / "logs", env=env) as started:
        yield started


_OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _api(server: Server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=server.url, headers=headers, timeout=30)
    _OPEN.append(client)
    return client


def _new_user(admin: httpx.Client, name: str) -> str:
    made = admin.post("/api/users", json={"name": name})
    assert made.status_code == 201, made.text
    token: str = made.json()["token"]
    assert made.json()["user"] == {
        "name": name,
        "role": "member",
        "created": made.json()["user"]["created"],
        "token_expires": None,
    }
    return token


def _register_stacks(api: httpx.Client, name: str, tmp: Path) -> None:
    """``NAME-private`` and ``NAME-shared``, each of its own components."""
    for kind, shared in (("private", False), ("shared", True)):
        stack = f"{name}-{kind}"
        for body in (
            {"type": "orchestrator", "name": f"{stack}-o", "flavor": "local"},
            {
                "type": "artifact_store",
                "name": f"{stack}-a",
                "flavor": "local",
                "config": {"path": str(tmp / stack)},
            },
        ):
            assert api.post("/api/components", json=body).status_code == 201
        made = api.post(
            "/api/stacks",
            json={
                "name": stack,
                "components": {"orchestrator": f"{stack}-o", "artifact_store": f"{stack}-a"},
                "shared": shared,
            },
        )
        assert made.status_code == 201, made.text
        assert made.json()["owner"] == name and made.json()["shared"] is shared


def _names(api: httpx.Client, path: str) -> set[str]:
    return {item["name"] for item in api.get(path, params={"limit": 500}).json()["items"]}


def _wait(api: httpx.Client, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (run := api.get(f"/api/runs/{run_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    return run  # type: ignore[no-any-return]


def test_two_users_see_their_own_and_shared_stacks_never_the_others_private(
    server: Server, tmp_path: Path
) -> None:
    admin = _api(server, ADMIN_TOKEN)
    assert admin.get("/api/me").json()["name"] == "default"
    tokens = {name: _new_user(admin, name) for name in ("alice", "bob")}
    alice, bob = _api(server, tokens["alice"]), _api(server, tokens["bob"])
    assert alice.get("/api/me").json()["role"] == "member"
    _register_stacks(alice, "alice", tmp_path)
    _register_stacks(bob, "bob", tmp_path)

    assert _names(alice, "/api/stacks") == {"alice-private", "alice-shared", "bob-shared"}
    assert _names(bob, "/api/stacks") == {"bob-private", "bob-shared", "alice-shared"}
    assert "bob-private-o" not in _names(alice, "/api/components")
    assert alice.get("/api/stacks/bob-private").status_code == 404
    assert _names(admin, "/api/stacks") >= {"alice-private", "bob-private", "default"}

    # The dashboard shows the same, and who is logged in.
    page = alice.get("/")
    assert page.status_code == 200 and "Signed in as <strong>alice</strong>" in page.text
    assert "bob-shared" in page.text and "bob-private" not in page.text

    # A member cannot delete, rename or unshare the other's shared stack; an admin can.
    refused = alice.delete("/api/stacks/bob-shared")
    assert refused.status_code == 403 and "belongs to user 'bob'" in refused.json()["message"]
    assert alice.post("/api/stacks/bob-shared/share", json={"shared": False}).status_code == 403
    assert alice.get("/api/users").status_code == 403  # nor manage users
    assert admin.delete("/api/stacks/bob-shared").status_code == 204
    assert "bob-shared" not in _names(bob, "/api/stacks")

    # Active stacks are per user.
    assert alice.post("/api/stacks/alice-private/activate").status_code == 200
    assert [s["name"] for s in alice.get("/api/stacks").json()["items"] if s["active"]] == [
        "alice-private"
    ]
    assert not [s for s in bob.get("/api/stacks").json()["items"] if s["active"]]


def test_runs_show_who_submitted_them(server: Server, tmp_path: Path) -> None:
    admin = _api(server, ADMIN_TOKEN)
    alice = _api(server, _new_user(admin, "alice"))
    bob = _api(server, _new_user(admin, "bob"))
    # Members use the default stack once the admin shares it.
    assert alice.post("/api/runs", json={"pipeline": GATED}).status_code == 404
    assert admin.post("/api/stacks/default/share", json={"shared": True}).status_code == 200
    submitted = alice.post("/api/runs", json={"pipeline": GATED, "parameters": {"n": 1}})
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["user"] == "alice"
    assert _wait(alice, submitted.json()["id"])["user"] == "alice"
    mine = admin.get("/api/runs", params={"user": "alice"}).json()["items"]
    assert [r["id"] for r in mine] == [submitted.json()["id"]]
    assert admin.get("/api/runs", params={"user": "bob"}).json()["items"] == []
    page = admin.get(f"/runs/{submitted.json()['id']}")
    assert page.status_code == 200 and 'class="run-user">alice<' in page.text
    # Every user reads every run's spec; the folder it was compiled in (a path on the
    # submitter's machine, where `run retry` compiles it again) only who may retry it.
    specs = {
        who: api.get(f"/api/runs/{submitted.json()['id']}/spec").json()
        for who, api in (("alice", alice), ("admin", admin), ("bob", bob))
    }
    assert specs["alice"]["folder"] and specs["alice"]["folder"].startswith("/")
    assert specs["admin"] == specs["alice"]
    assert specs["bob"] == {**specs["alice"], "folder": None}

    # Only its submitter or an admin cancels, retries or deletes a run.
    gate = tmp_path / "gate"
    held = alice.post("/api/runs", json={"pipeline": GATED, "parameters": {"gate": str(gate)}})
    assert held.status_code == 201, held.text
    run = held.json()["id"]
    for method, path in (("POST", "cancel"), ("POST", "retry"), ("DELETE", "")):
        refused = bob.request(method, f"/api/runs/{run}/{path}".rstrip("/"))
        assert refused.status_code == 403, (method, path, refused.text)
        assert "belongs to user 'alice'" in refused.json()["message"]
    assert alice.get(f"/api/runs/{run}").json()["status"] in ("pending", "running")
    assert alice.post(f"/api/runs/{run}/cancel").status_code == 202
    gate.touch()
    retried = alice.post(f"/api/runs/{run}/retry")
    assert retried.status_code == 201, retried.text
    assert (retried.json()["user"], retried.json()["retry_of"]) == ("alice", run)
    assert _wait(alice, retried.json()["id"])["status"] == "completed"
    assert bob.delete(f"/api/runs/{retried.json()['id']}").status_code == 403
    assert admin.delete(f"/api/runs/{retried.json()['id']}").status_code == 204


OPEN_ROUTES = {
    ("GET", "/healthz"),  # probes
    ("GET", "/login"),  # the dashboard's login form, and its answer
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/openapi.json"),  # what the API is, not what it holds
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
"""Routes that answer without a user: every other one must refuse a bad token."""


def _every_route() -> list[tuple[str, str]]:
    """(method, path with each parameter filled in) of every route of the app but the open
    ones, so that a route added later is walked too."""
    from conveyor.service.api.app import create_app

    def leaves(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            # FastAPI 0.165 keeps an included router as one route of its own.
            contexts = getattr(route, "effective_route_contexts", None)
            yield from (contexts() if contexts is not None else [route])

    app = create_app(ROOT / "unused-home", token=ADMIN_TOKEN)
    found = {
        (method, route.path)
        for route in leaves(app.routes)
        for method in getattr(route, "methods", None) or ()  # a Mount (static files) has none
        if method != "HEAD"
    }
    assert found >= OPEN_ROUTES
    walked = sorted(found - OPEN_ROUTES)
    assert len(walked) > 30 and ("GET", "/api/stacks") in walked and ("GET", "/") in walked
    return [(method, re.sub(r"\{[^}]+\}", "x", path)) for method, path in walked]


def _expire(home: Path, user: str) -> None:
    """Make ``user``'s token one that expired a minute ago (as time passing would)."""
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    with closing(sqlite3.connect(home / "conveyor.db", timeout=30)) as db, db:
        assert (
            db.execute("UPDATE users SET token_expires = ? WHERE name = ?", (past, user)).rowcount
            == 1
        )


def test_wrong_expired_deleted_and_rotated_tokens_get_401_on_every_route(
    server: Server, home: Path, tmp_path: Path
) -> None:
    admin = _api(server, ADMIN_TOKEN)
    deleted = _new_user(admin, "gone")
    rotated = _new_user(admin, "carol")
    fresh = admin.post("/api/users/carol/rotate-token").json()["token"]
    assert admin.delete("/api/users/gone").status_code == 204
    made = admin.post("/api/users", json={"name": "dave", "expires_in": "1h"})
    assert made.status_code == 201 and made.json()["user"]["token_expires"] is not None
    expired = made.json()["token"]
    # The dashboard's session of a token that then expires ends with it.
    browser = _api(server, None)
    assert browser.post("/login", data={"token": expired, "next": "/"}).status_code == 303
    laptop = tmp_path / "laptop"
    assert cli("login", server.url, "--token", expired, home=laptop).exit_code == 0
    _expire(home, "dave")
    assert browser.get("/", follow_redirects=False).status_code == 303  # to /login

    bad = {"wrong": "cvy_wrong", "expired": expired, "deleted": deleted, "rotated": rotated}
    clients = {why: _api(server, token) for why, token in bad.items()}
    for method, path in _every_route():
        for why, client in clients.items():
            answer = client.request(method, path, follow_redirects=False)
            assert answer.status_code == 401, (method, path, why, answer.text[:200])
            for secret in (*bad.values(), fresh, ADMIN_TOKEN):
                assert secret not in answer.text
    for why, token in bad.items():  # nor does the dashboard's login form take them
        refused = _api(server, None).post("/login", data={"token": token, "next": "/"})
        assert refused.status_code == 401 and "conveyor_session" not in refused.headers.get(
            "set-cookie", ""
        ), why
    assert _api(server, fresh).get("/api/me").status_code == 200

    # The CLI of a home logged in with a token that expired: one line, the way back, exit 1.
    listed = conveyor_cli("stack", "list", env=_in(laptop))
    assert listed.returncode == 1 and listed.stdout == "", listed.stdout
    assert listed.stderr.startswith("Error: ") and len(listed.stderr.splitlines()) == 1
    assert "expired" in listed.stderr and f"conveyor login {server.url}" in listed.stderr
    status = cli("status", home=laptop)
    assert status.exit_code == 1 and "conveyor login" in status.stderr
    assert server.stop() == 0
    shown = server.output() + listed.stderr + status.stdout + status.stderr
    for secret in (*bad.values(), fresh, ADMIN_TOKEN):
        assert secret not in shown


def _in(home: Path) -> dict[str, str]:
    return {"CONVEYOR_HOME": str(home), "CONVEYOR_SERVER_TOKEN": ""}


def test_tokens_never_reach_the_log_or_other_answers(server: Server, tmp_path: Path) -> None:
    admin = _api(server, ADMIN_TOKEN)
    token = _new_user(admin, "alice")
    alice = _api(server, token)
    _register_stacks(alice, "alice", tmp_path)
    answers = [alice.get(path).text for path in ("/api/me", "/api/stacks", "/api/components")]
    answers += [admin.get("/api/users").text, alice.get("/").text]
    for text in answers:
        assert token not in text and ADMIN_TOKEN not in text
    assert server.stop() == 0
    log = server.output()
    assert token not in log and ADMIN_TOKEN not in log


def test_the_first_server_up_prints_the_admin_token_once(tmp_path: Path) -> None:
    env = {ADMIN_TOKEN_ENV: "", TOKEN_ENV: ""}
    with running_server(tmp_path / "first", env=env) as first:
        printed = first.stderr.read_text()
        assert "Created the admin user 'default'" in printed
        token = printed.split("shown only now: ", 1)[1].split()[0]
        assert _api(first, token).get("/api/me").json()["name"] == "default"
        # On loopback without a server token, a request without one acts as the admin.
        assert _api(first, None).get("/api/me").json()["name"] == "default"
        assert _api(first, "wrong").get("/api/me").status_code == 401
    with running_server(tmp_path / "second", env=env) as second:
        assert "Created the admin user" not in second.stderr.read_text()
        assert _api(second, token).get("/api/me").status_code == 200
    listed = conveyor_cli("user", "list")
    assert listed.returncode == 0 and "default" in listed.stdout and "admin" in listed.stdout
    assert token not in listed.stdout + listed.stderr


def test_the_dashboard_logs_each_user_in_and_forgets_a_rotated_token(server: Server) -> None:
    admin = _api(server, ADMIN_TOKEN)
    token = _new_user(admin, "alice")
    browser = _api(server, None)
    wrong = browser.post("/login", data={"token": "nope", "next": "/"})
    assert wrong.status_code == 401 and "conveyor_session" not in wrong.headers.get(
        "set-cookie", ""
    )
    logged_in = browser.post("/login", data={"token": token, "next": "/"})
    assert logged_in.status_code == 303
    cookie = logged_in.headers["set-cookie"]
    assert token not in cookie and "conveyor_session=alice." in cookie
    page = browser.get("/")
    assert page.status_code == 200 and "Signed in as <strong>alice</strong>" in page.text
    assert "(admin)" not in page.text
    # A rotated token ends the sessions it opened.
    assert admin.post("/api/users/alice/rotate-token").status_code == 200
    after = browser.get("/", follow_redirects=False)
    assert after.status_code == 303 and after.headers["location"].startswith("/login")
