"""Users, tokens, owners and sharing: the rules, called directly on a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from conveyor.contracts import (
    ComponentType,
    ConflictError,
    NotAllowed,
    NotFoundError,
    Role,
    ValidationError,
)
from conveyor.service.context import Services
from conveyor.service.users import (
    LOCAL_ADMIN,
    LOCAL_USER,
    TOKEN_PREFIX,
    Actor,
    new_token,
    parse_lifetime,
    token_hash,
)

ORCH, STORE = ComponentType.ORCHESTRATOR, ComponentType.ARTIFACT_STORE
ALICE, BOB, ROOT = Actor("alice", admin=False), Actor("bob", admin=False), Actor("root", True)


@pytest.fixture
async def services(home: Path) -> AsyncIterator[Services]:
    opened = await Services.open(home)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.mark.parametrize(
    ("actor", "owner", "shared", "sees", "changes"),
    [
        (ALICE, "alice", False, True, True),
        (ALICE, "bob", False, False, False),
        (ALICE, "bob", True, True, False),
        (ROOT, "bob", False, True, True),
        (LOCAL_ADMIN, "default", False, True, True),
    ],
)
def test_who_sees_and_changes_what(
    actor: Actor, owner: str, shared: bool, sees: bool, changes: bool
) -> None:
    assert actor.may_see(owner, shared) is sees
    assert actor.may_change(owner) is changes


def test_tokens_are_long_random_and_kept_as_digests() -> None:
    first, second = new_token(), new_token()
    assert first != second and first.startswith(TOKEN_PREFIX) and len(first) >= 40
    assert token_hash(first) == token_hash(first) != token_hash(second)
    assert first not in token_hash(first)


async def test_a_token_finds_its_user_until_rotated_or_deleted(services: Services) -> None:
    users = services.users
    alice, token = await users.create("alice")
    assert alice.role is Role.MEMBER
    assert (await users.authenticate(token)) == alice
    for wrong in ("", "nope", token + "x", token[:-1], "%", "_", "x" * 10_000):
        assert await users.authenticate(wrong) is None
    _, rotated = await users.rotate_token("alice")
    assert await users.authenticate(token) is None
    assert (await users.authenticate(rotated)) == alice
    await users.delete("alice")
    assert await users.authenticate(rotated) is None
    # Only digests are stored.
    rows = await services.db.fetchall("SELECT * FROM users")
    assert rotated not in str([tuple(r) for r in rows])


async def test_user_rules(services: Services) -> None:
    users = services.users
    await users.create("alice")
    with pytest.raises(ConflictError, match="exists already"):
        await users.create("alice")
    for bad in ("", "a b", "../x", "%", "x" * 101):
        with pytest.raises(ValidationError):
            await users.create(bad)
    with pytest.raises(NotFoundError, match="did you mean: alice"):
        await users.rotate_token("alicee")
    created = await users.ensure_admin()
    assert created is not None and (await users.authenticate(created)) is not None
    assert await users.ensure_admin() is None  # only on first use
    with pytest.raises(ConflictError, match="last admin"):
        await users.delete(LOCAL_USER)
    # A token given to the server is the admin's from then on.
    await users.ensure_admin("given-admin-token-0123456789")
    assert await users.authenticate(created) is None
    admin = await users.authenticate("given-admin-token-0123456789")
    assert admin is not None and admin.role is Role.ADMIN


async def _stack_of(services: Services, actor: Actor, name: str, shared: bool) -> None:
    mine = services.stacks.for_user(actor)
    await mine.register_component(ORCH, f"{name}-o", "local")
    await mine.register_component(STORE, f"{name}-a", "local", {"path": f"/tmp/{name}"})
    await mine.register_stack(name, {ORCH: f"{name}-o", STORE: f"{name}-a"}, shared=shared)


async def test_private_stacks_are_their_owners_and_shared_ones_everyones(
    services: Services,
) -> None:
    await _stack_of(services, ALICE, "alice-private", False)
    await _stack_of(services, ALICE, "alice-shared", True)
    await _stack_of(services, BOB, "bob-private", False)
    await _stack_of(services, BOB, "bob-shared", True)
    alice, bob = services.stacks.for_user(ALICE), services.stacks.for_user(BOB)

    seen = {s.name for s in await alice.list_stacks()}
    assert seen == {"alice-private", "alice-shared", "bob-shared"}
    shared = await alice.get("alice-shared")
    assert shared.owner == "alice" and shared.shared
    # A shared stack's components are shared with it; a private one's stay private.
    assert all(c.shared for c in shared.components.values())
    assert {c.name for c in await alice.list_components(ORCH)} == {
        "alice-private-o",
        "alice-shared-o",
        "bob-shared-o",
    }
    with pytest.raises(NotFoundError):
        await alice.get("bob-private")
    with pytest.raises(NotFoundError):
        await alice.get_component(ORCH, "bob-private-o")
    with pytest.raises(NotFoundError):  # nor can she build a stack of it
        await alice.register_stack("x", {ORCH: "bob-private-o", STORE: "alice-private-a"})

    for change in (
        alice.delete_stack("bob-shared"),
        alice.rename_stack("bob-shared", "mine"),
        alice.update_stack("bob-shared", {STORE: "alice-private-a"}),
        alice.share_stack("bob-shared", False),
        alice.delete_component(ORCH, "bob-shared-o"),
    ):
        with pytest.raises(NotAllowed, match="belongs to user 'bob'"):
            await change
    assert (await bob.get("bob-shared")).shared

    # Active stacks are per user.
    await alice.activate("bob-shared")
    await bob.activate("bob-private")
    assert await alice.active_name() == "bob-shared"
    assert await bob.active_name() == "bob-private"
    assert await services.stacks.active_name() == "default"

    # Unsharing hides it from others; an admin sees and deletes anything.
    await bob.share_stack("bob-shared", False)
    with pytest.raises(NotFoundError):
        await alice.get("bob-shared")
    root = services.stacks.for_user(ROOT)
    assert {s.name for s in await root.list_stacks()} >= {"alice-private", "bob-private"}
    await root.delete_stack("alice-shared")
    assert "alice-shared" not in {s.name for s in await alice.list_stacks()}


async def test_the_local_user_owns_what_existed_before_users(services: Services) -> None:
    default = await services.stacks.get("default")
    assert default.owner == LOCAL_USER and not default.shared
    with pytest.raises(NotFoundError):
        await services.stacks.for_user(ALICE).get("default")
    await services.stacks.share_stack("default")
    assert (await services.stacks.for_user(ALICE).get("default")).shared


def test_a_logged_in_client_answers_every_call_through_the_server() -> None:
    """Nothing of ``Client`` falls through to the home's own store in client mode."""
    from conveyor.service.client import Client
    from conveyor.service.remote_client import RemoteClient

    public = {n for n in vars(Client) if not n.startswith("_") and n != "local"}
    missing = {n for n in public if n not in vars(RemoteClient)}
    assert not missing, f"RemoteClient must answer these itself: {sorted(missing)}"


@pytest.mark.parametrize(
    ("part", "quoted"),
    [("a", "a"), ("a/b", "a%2Fb"), ("%", "%25"), ("a?b#c", "a%3Fb%23c"), ("_x", "_x")],
)
def test_names_stay_one_path_segment(part: str, quoted: str) -> None:
    from conveyor.service.remote_client import _path

    assert _path(part) == quoted
    for bad in ("", ".", ".."):
        with pytest.raises(ValidationError):
            _path(bad)


def test_the_login_file_is_its_users_only_and_never_shows_the_token(home: Path) -> None:
    from conveyor.service.home import Home
    from conveyor.service.login import Login, forget_login, read_login, save_login

    resolved = Home(home)
    login = Login(url="http://x", user="alice", token="cvy_secret")
    path = save_login(resolved, login)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_login(resolved) == login and "cvy_secret" not in repr(login)
    assert forget_login(resolved) and read_login(resolved) is None
    assert not forget_login(resolved)


@pytest.mark.parametrize(
    ("client", "server", "ok"),
    [
        ("1.2.0", "1.9.3", True),
        ("0.1.0", "0.2", True),
        ("1.0", "2.0", False),
        ("2.0", "1.5", False),
    ],
)
def test_another_major_version_is_told_apart(client: str, server: str, ok: bool) -> None:
    from conveyor.service.version import incompatible

    problem = incompatible(client, server)
    assert (problem is None) is ok
    if problem:
        assert server in problem and "major" in problem


async def test_a_renamed_stack_stays_active_for_every_user_who_chose_it(
    services: Services,
) -> None:
    await _stack_of(services, ALICE, "team", True)
    alice, bob = services.stacks.for_user(ALICE), services.stacks.for_user(BOB)
    await alice.activate("team")
    await bob.activate("team")
    await _stack_of(services, BOB, "team_x", True)  # '_' is no wildcard here
    await alice.rename_stack("team", "team-2")
    assert await alice.active_name() == "team-2"
    assert await bob.active_name() == "team-2"
    assert await services.stacks.active_name() == "default"


def test_a_token_lifetime_is_bounded_and_says_what_it_takes() -> None:
    assert parse_lifetime("12h") == timedelta(hours=12)
    assert parse_lifetime(" 30D ") == timedelta(days=30)
    assert parse_lifetime("2w") == timedelta(weeks=2)
    for hostile in ("", "30", "d", "1.5d", "-1d", "%", "_h", "30m", "1y", "9" * 100_000):
        with pytest.raises(ValidationError, match="a whole number and a unit, h, d or w"):
            parse_lifetime(hostile)
    for out_of_bounds in ("0h", "367d", "999999w"):
        with pytest.raises(ValidationError, match="from 1h to 366d"):
            parse_lifetime(out_of_bounds)


async def test_an_expired_token_logs_nobody_in_and_a_rotation_sets_a_new_lifetime(
    services: Services,
) -> None:
    users = services.users
    user, token = await users.create("alice", expires_in="1h")
    assert user.token_expires is not None and await users.authenticate(token) == user
    assert await users.session_key("alice") is not None
    async with services.db.transaction() as conn:
        past = user.model_copy(update={"token_expires": user.created - timedelta(minutes=1)})
        await users.store.save(conn, past, token_hash(token))
    assert await users.authenticate(token) is None
    assert await users.session_key("alice") is None  # a dashboard session ends with it
    rotated, fresh = await users.rotate_token("alice")
    assert rotated.token_expires is None and await users.authenticate(fresh) == rotated
    with pytest.raises(ValidationError):
        await users.rotate_token("alice", "0h")
    assert await users.authenticate(fresh) == rotated  # a refused rotation changed nothing
