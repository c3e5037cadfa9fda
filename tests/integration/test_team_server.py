"""A team's server: ``conveyor server up`` in one home, users with their own tokens, private
and shared stacks, runs with their users, and tokens that never leak."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.service.api.security import ADMIN_TOKEN_ENV, TOKEN_ENV
from tests.conftest import ROOT, Server, conveyor_cli, running_server

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


def test_runs_show_who_submitted_them(server: Server) -> None:
    admin = _api(server, ADMIN_TOKEN)
    alice = _api(server, _new_user(admin, "alice"))
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


@pytest.mark.parametrize("route", ["/api/me", "/api/stacks", "/api/runs", "/metrics", "/"])
def test_wrong_deleted_and_rotated_tokens_get_401_everywhere(server: Server, route: str) -> None:
    admin = _api(server, ADMIN_TOKEN)
    deleted = _new_user(admin, "gone")
    rotated = _new_user(admin, "carol")
    fresh = admin.post("/api/users/carol/rotate-token").json()["token"]
    assert admin.delete("/api/users/gone").status_code == 204
    for token in (None, "wrong", "%", "_" * 5000, deleted, rotated):
        response = _api(server, token).get(route, follow_redirects=False)
        expected = {303} if route == "/" and token is None else {401}
        assert response.status_code in expected, (token, response.status_code)
    assert _api(server, fresh).get(route).status_code == 200


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
