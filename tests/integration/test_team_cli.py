"""Client mode: homes logged in to a server, each as its own user, use the same commands as
against a local store; they see their own private stacks and every shared one."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.service.client import Client
from conveyor.service.remote_client import RemoteClient
from tests.integration.cli_helpers import (
    ADMIN_TOKEN,
    as_json,
    cli,
    log_in,
    new_user,
    ok,
    refused,
    rows,
    team_server,
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with team_server(tmp_path / "logs", tmp_path / "server-home") as url:
        yield url


def _stacks_of(home: Path, name: str, tmp: Path) -> None:
    for kind, share in (("private", []), ("shared", ["--share"])):
        stack = f"{name}-{kind}"
        ok("orchestrator", "register", f"{stack}-o", "--flavor", "local", *share, home=home)
        ok(
            "artifact-store",
            "register",
            f"{stack}-a",
            "--flavor",
            "local",
            f"--path={tmp / stack}",
            home=home,
        )
        ok("stack", "register", stack, "-o", f"{stack}-o", "-a", f"{stack}-a", *share, home=home)


def test_two_logged_in_users_share_stacks_as_on_a_team_server(server: str, tmp_path: Path) -> None:
    admin, alice, bob = (tmp_path / n for n in ("admin", "alice", "bob"))
    log_in(admin, server)
    for name, home in (("alice", alice), ("bob", bob)):
        log_in(home, server, new_user(name, admin_home=admin))
    _stacks_of(alice, "alice", tmp_path)
    _stacks_of(bob, "bob", tmp_path)
    # No local store was made in the users' homes: everything lives on the server.
    assert not (alice / "conveyor.db").exists()

    listed = rows(ok("stack", "list", home=alice).stdout)
    assert listed[0] == [
        "ACTIVE",
        "STACK NAME",
        "STACK ID",
        "SHARED",
        "OWNER",
        "ARTIFACT_STORE",
        "ORCHESTRATOR",
    ]
    seen = {(r[1], r[3], r[4]) for r in listed[1:]}
    assert seen == {
        ("alice-private", "➖", "alice"),
        ("alice-shared", "✅", "alice"),
        ("bob-shared", "✅", "bob"),
    }
    assert {s["name"] for s in as_json("stack", "list", home=bob)} == {
        "bob-private",
        "bob-shared",
        "alice-shared",
    }
    described = ok("stack", "describe", "alice-shared", home=bob).stdout
    assert "is owned by user alice and is 'shared'" in " ".join(described.split())
    assert "no stack named 'alice-private'" in refused(
        "stack", "describe", "alice-private", home=bob
    )
    components = rows(ok("orchestrator", "list", home=bob).stdout)
    assert {r[1] for r in components[1:]} == {"bob-private-o", "bob-shared-o", "alice-shared-o"}

    # Only the owner or an admin deletes.
    # Refused before the confirmation is asked (GET /api/stacks/NAME?deletable=true).
    assert "belongs to user 'bob'" in refused("stack", "delete", "bob-shared", home=alice)
    ok("stack", "delete", "bob-shared", "-y", home=admin)
    assert "bob-shared" not in {s["name"] for s in as_json("stack", "list", home=alice)}
    assert "belongs to user 'bob'" in refused("orchestrator", "delete", "bob-shared-o", home=alice)

    # The active stack is each user's own.
    ok("stack", "set", "alice-private", home=alice)
    assert "The active stack is 'alice-private'" in ok("stack", "get", home=alice).stdout
    assert [s["name"] for s in as_json("stack", "list", home=bob) if s["active"]] == []

    # The Python Client of a logged-in home is the server's too.
    os.environ["CONVEYOR_HOME"] = str(alice)
    try:
        with Client() as client:
            assert isinstance(client, RemoteClient)
            assert client.active_stack_name() == "alice-private"
        with Client.local(alice) as local:
            assert not isinstance(local, RemoteClient)
    finally:
        os.environ.pop("CONVEYOR_HOME")


def test_status_login_and_tokens(server: str, tmp_path: Path) -> None:
    admin, carol = tmp_path / "admin", tmp_path / "carol"
    assert "Local store:" in ok("status", home=carol).stdout
    log_in(admin, server)
    token = new_user("carol", admin_home=admin)
    assert token not in ok("user", "list", home=admin).stdout

    wrong = cli("login", server, "--token", "wrong-token", home=carol)
    assert wrong.exit_code == 1 and "does not know this token" in wrong.stderr
    logged_in = ok("login", server, "--token", token, home=carol)
    # A new member's active stack is the default one, the admin's private stack: told so.
    said = " ".join(logged_in.stderr.split())
    assert "Your active stack, 'default', is not one you may use" in said
    assert "conveyor stack set NAME" in said and token not in said
    login_file = carol / "login.json"
    assert stat.S_IMODE(login_file.stat().st_mode) == 0o600
    shown = ok("status", home=carol)
    assert f"Server: {server}" in shown.stdout and "User: carol (member)" in shown.stdout
    assert "Active stack: default" in shown.stdout and "Server version:" in shown.stdout
    assert "conveyor stack set NAME" in " ".join(shown.stdout.split())
    assert token not in shown.stdout + shown.stderr
    nothing = ok("stack", "list", home=carol)
    assert rows(nothing.stdout)[1:] == [] and "No stack you may use yet" in nothing.stderr
    described = refused("stack", "describe", home=carol)
    assert "no stack named 'default'" in described and "conveyor stack set NAME" in described
    ok("stack", "share", "default", home=admin)
    assert "stack set" not in ok("status", home=carol).stdout

    # A token with a lifetime: shown in the user list, never the token.
    made = ok("user", "create", "ci-bot", "--expires-in", "30d", home=admin)
    assert "the token expires at" in made.stderr
    listed = rows(ok("user", "list", home=admin).stdout)
    assert listed[0] == ["USER", "ROLE", "CREATED", "TOKEN EXPIRES"]
    expiry = {r[0]: r[3] for r in listed[1:]}
    assert expiry["carol"] == "-" and expiry["ci-bot"].startswith("20")
    assert made.stdout.strip() not in str(listed)
    assert "from 1h to 366d" in refused(
        "user", "rotate-token", "ci-bot", "--expires-in", "0h", home=admin
    )
    assert "only an admin may create users" in refused("user", "create", "eve", home=carol)

    # A rotated token is refused at once, with the way out.
    ok("user", "rotate-token", "carol", home=admin)
    assert "401" not in (message := refused("stack", "list", home=carol))
    assert "conveyor login" in message
    ok("logout", home=carol)
    assert "Local store:" in ok("status", home=carol).stdout
    assert ADMIN_TOKEN not in (tmp_path / "logs" / "server.err").read_text()


def test_a_logged_in_home_lists_reads_and_loads_the_servers_runs(
    server: str, tmp_path: Path
) -> None:
    """A run submitted as alice (through the API: ``pipeline run`` from a laptop is not
    built yet) is listed, described, its logs read and its output loaded from her home,
    which has no store of its own."""
    import httpx

    from tests.integration.api_helpers import QUICKSTART

    admin, alice = tmp_path / "admin", tmp_path / "alice"
    log_in(admin, server)
    ok("stack", "share", "default", home=admin)
    token = new_user("alice", admin_home=admin)
    log_in(alice, server, token)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server, headers=headers, timeout=60) as api:
        made = api.post("/api/runs", json={"pipeline": QUICKSTART, "parameters": {"epochs": 2}})
        assert made.status_code == 201, made.text
        run_id = made.json()["id"]
        while api.get(f"/api/runs/{run_id}").json()["status"] not in ("completed", "failed"):
            pass

    listed = rows(ok("run", "list", "--user", "alice", home=alice).stdout)
    assert listed[0][-1] == "USER" and [(r[0], r[3], r[-1]) for r in listed[1:]] == [
        (run_id, "completed", "alice")
    ]
    assert rows(ok("run", "list", "--user", "bob", home=alice).stdout)[1:] == []
    described = " ".join(ok("run", "describe", run_id[:8], home=alice).stdout.split())
    assert f"Run {run_id}" in described and "submitted by alice: completed" in described
    # The same output as on the server's own home (its local store).
    server_home = tmp_path / "server-home"
    for command in (
        ("run", "logs", run_id),
        ("run", "describe", run_id),
        ("run", "list", "--user", "alice"),
        ("stack", "describe", "default"),
    ):
        remote, local = ok(*command, home=alice), ok(*command, home=server_home)
        assert (remote.stdout, remote.stderr) == (local.stdout, local.stderr), command
    artifacts = as_json("artifact", "list", "--run", run_id, home=alice)
    evaluation = next(a for a in artifacts if a["step_name"] == "evaluate")
    value = ok("artifact", "get", evaluation["id"], home=alice).stdout
    assert "accuracy" in value
    saved = tmp_path / "weights.bin"
    weights = next(a for a in artifacts if a["step_name"] == "train")
    ok("artifact", "get", weights["id"], "--to", str(saved), home=alice)
    assert saved.stat().st_size == weights["ref"]["size"]
    assert not (alice / "conveyor.db").exists()


def test_a_run_from_a_logged_in_home_stops_rather_than_run_locally(tmp_path: Path) -> None:
    """``pipeline run`` and a retry go through the server (test_team_runs.py): one that does
    not answer is said so, and nothing runs on the home's own store."""
    from conveyor.service.home import Home
    from conveyor.service.login import Login, save_login
    from tests.integration.api_helpers import QUICKSTART

    laptop = tmp_path / "laptop"
    save_login(Home(laptop), Login(url="http://127.0.0.1:9", user="alice", token="cvy_x"))
    message = refused("pipeline", "run", QUICKSTART, home=laptop)
    assert "logged in to http://127.0.0.1:9" in message and "conveyor logout" in message
    from conveyor.contracts import ConveyorError
    from conveyor.service.client import Client

    with pytest.raises(ConveyorError, match=r"logged in to http://127.0.0.1:9, which does not"):
        Client(laptop).retry_run("abcd")
    assert not (laptop / "conveyor.db").exists()


def test_a_damaged_login_file_is_one_line(tmp_path: Path) -> None:
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    (laptop / "login.json").write_text("{not json")
    message = refused("stack", "list", home=laptop)
    assert "cannot read the login in" in message and "log in again" in message


def test_a_member_on_an_embedded_stack_is_told_which_stacks_take_their_runs(
    server: str, tmp_path: Path
) -> None:
    admin, dave = tmp_path / "admin", tmp_path / "dave"
    log_in(admin, server)
    token = new_user("dave", admin_home=admin)
    ok("stack", "share", "default", home=admin)
    # The default stack is embedded: it runs steps inside the server, never a member's code.
    logged_in = " ".join(ok("login", server, "--token", token, home=dave).stderr.split())
    assert "stack 'default' is embedded" in logged_in
    assert "no stack you may use takes your runs yet" in logged_in
    assert "ask an admin to share one" in logged_in

    ok("orchestrator", "register", "team-o", "--flavor", "rabbitmq", "--share", home=admin)
    ok("stack", "register", "team", "-o", "team-o", "-a", "default", "--share", home=admin)
    shown = " ".join(ok("status", home=dave).stdout.split())
    assert "Active stack: default" in shown and "stack 'default' is embedded" in shown
    assert "stacks that take your runs: team (conveyor stack set NAME" in shown
    quickstart = f"{Path(__file__).parents[2] / 'examples' / 'quickstart.py'}:training_pipeline"
    run = cli("pipeline", "run", quickstart, home=dave)
    assert run.exit_code == 1 and "Traceback" not in run.stderr + run.stdout
    said = " ".join(run.stderr.split())
    assert said.startswith("Error: stack 'default' is embedded")
    assert "stacks that take your runs: team" in said

    ok("stack", "set", "team", home=dave)
    assert "will not take your runs" not in ok("status", home=dave).stdout
    # An admin's own code runs on the embedded stack: nothing to say.
    assert "will not take your runs" not in ok("status", home=admin).stdout
