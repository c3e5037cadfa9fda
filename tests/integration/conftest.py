"""Where a CLI test's commands go: ``place`` runs each test of a module that uses it twice,
against the test's own home (``local``) and from a home logged in to a server (``server``).

The server is one ``conveyor server up`` for the whole session (a server start costs seconds;
CI's budget is tight). Each test gets a fresh member and the server's ``default`` stack is
shared (by its admin, once), so that a member's first ``stack list`` looks as a fresh home's
does. Stack and component names are unique on a server, as in one store: after each test the
admin deletes what its member made, so that the next test may reuse the same names.

A test that cannot hold against a server yet says why with ``@local_only("...")``; deleting
that one line runs its server variant.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conveyor.service.remote_client import RemoteClient
from tests.integration.cli_helpers import ADMIN_TOKEN, log_in, new_user, ok, team_server

PLACES = ("local", "server")
_members = itertools.count(1)


@dataclass(frozen=True)
class TeamServer:
    url: str
    admin_home: Path
    logs: Path
    tokens: list[str] = field(default_factory=list)
    """Every member's token: none may reach the server's log."""


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    """One server for every CLI test of the session, with its admin's home logged in and
    the default stack shared with its members."""
    root = tmp_path_factory.mktemp("team-server")
    with team_server(root / "logs", root / "server-home") as url:
        admin = root / "admin"
        log_in(admin, url)
        ok("stack", "share", "default", home=admin)
        server = TeamServer(url, admin, root / "logs")
        yield server
    log = "".join(p.read_text() for p in server.logs.iterdir())
    leaked = [t for t in [ADMIN_TOKEN, *server.tokens] if t in log]
    assert not leaked, f"{len(leaked)} tokens in the shared server's log {server.logs}"


@pytest.fixture(params=PLACES)
def place(request: pytest.FixtureRequest, home: Path) -> Iterator[str]:
    """``local``: the test's home is a fresh local store. ``server``: the test's home is
    logged in to the shared server as a fresh member (an admin for a test that runs pipelines
    on the default stack: see ``runs_pipelines``); what they made is deleted after."""
    marker = request.node.get_closest_marker("local_only")
    if request.param == "server" and marker is not None:
        pytest.skip(f"local only: {marker.kwargs['reason']}")
    if request.param == "local":
        yield "local"
        return
    server: TeamServer = request.getfixturevalue("shared_server")
    member = f"member-{next(_members)}"
    runs = request.node.get_closest_marker("runs_pipelines") is not None
    token = new_user(member, admin_home=server.admin_home, admin=runs)
    server.tokens.append(token)
    log_in(home, server.url, token)
    # As a fresh home: the default stack only (what an earlier test made was deleted).
    with RemoteClient(home) as fresh:
        seen = [(s.name, s.owner) for s in fresh.list_stacks()]
    assert seen == [("default", "default")], f"left over by an earlier test: {seen}"
    yield "server"
    _delete_what_they_made(server.admin_home, member)


def _delete_what_they_made(admin_home: Path, member: str) -> None:
    with RemoteClient(admin_home) as admin:
        for run in admin.list_runs(user=member, limit=10_000):
            admin.delete_run(run.id)
        for stack in admin.list_stacks():
            if stack.owner == member:
                admin.delete_stack(stack.name)
        for component in admin.list_components():
            if component.owner == member:
                admin.delete_component(component.type, component.name)
