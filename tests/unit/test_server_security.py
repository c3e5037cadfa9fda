"""The server's rules of who may connect: loopback by default, a token beyond it, names
it goes by, pages of its own origin, a bounded number of wrong tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.datastructures import Headers

from conveyor.contracts import ConflictError, ConveyorError, NotFoundError, ValidationError
from conveyor.service.api.errors import Forbidden, Unauthorized, status_of
from conveyor.service.api.host_check import allowed_names, host_allowed, host_name
from conveyor.service.api.login_limit import LoginAttempts
from conveyor.service.api.origin_check import cross_site
from conveyor.service.api.security import (
    SESSION_SECRET_FILE,
    safe_next,
    session_secret,
    session_value,
)
from conveyor.service.bind_checks import check_bind, check_token, is_loopback
from conveyor.service.home import Home
from conveyor.service.users import token_hash


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "example.com", "192.168.1.1"])
def test_other_hosts_need_a_token(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(ConflictError, match="CONVEYOR_SERVER_TOKEN"):
        check_bind(host, None)
    with pytest.raises(ConflictError):
        check_bind(host, "")
    check_bind(host, "a-long-random-token")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/runs/abc", "/runs/abc"),
        ("/stacks/x?offset=50", "/stacks/x?offset=50"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_login_only_returns_to_this_server(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


def test_the_session_cookie_names_its_user_and_proves_the_token_without_holding_it() -> None:
    secret, key = b"server-secret", token_hash("cvy_s3cret-token").encode()
    value = session_value(secret, "alice", key)
    assert value.startswith("alice.") and "s3cret" not in value and key.decode() not in value
    assert value == session_value(secret, "alice", key)
    # Another user, a rotated token (another digest), another server's secret: another value.
    assert value != session_value(secret, "bob", key)
    assert value != session_value(secret, "alice", token_hash("cvy_rotated").encode())
    assert value != session_value(b"other-secret", "alice", key)


def test_the_session_secret_is_made_once_in_the_home_and_a_damaged_one_is_named(
    tmp_path: Path,
) -> None:
    home = Home(tmp_path / "home")
    secret = session_secret(home)
    assert len(secret) == 32 and session_secret(home) == secret
    kept = home.path / SESSION_SECRET_FILE
    assert kept.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in home.path.iterdir()] == [SESSION_SECRET_FILE], "nothing staged left"
    kept.write_text("not hex")
    with pytest.raises(ConveyorError, match="delete the file to make a new one"):
        session_secret(home)
    kept.unlink()
    assert session_secret(home) != secret


def test_each_error_class_has_its_status() -> None:
    assert status_of(NotFoundError("x"))[0] == 404
    assert status_of(ConflictError("x"))[0] == 409
    assert status_of(ValidationError("x"))[0] == 422
    assert status_of(Unauthorized("x"))[0] == 401
    assert status_of(Forbidden("x"))[0] == 403
    assert status_of(ConveyorError("x"))[0] == 400
    assert status_of(ConveyorError("broker down", retryable=True))[0] == 503


# --- Host allow-list, origin checks, token length, login attempts ---


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:8237", "localhost"), ("LocalHost", "localhost"), ("[::1]:80", "::1"),
     ("[::1]", "::1"), ("10.0.0.1", "10.0.0.1"), ("", None), (":80", None), ("[::1", None),
     ("a:b", None), ("[::1]x", None), ("[nope]:1", None), ("h:1:2", None)],
)  # fmt: skip
def test_the_name_in_a_host_header(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_hosts_are_loopback_names_addresses_and_configured_names() -> None:
    allowed = allowed_names(["Conveyor.Example.com"])
    assert allowed == {"conveyor.example.com"}
    for header in ("localhost", "127.0.0.1:1", "[::1]:2", "192.168.1.9", "conveyor.example.com"):
        assert host_allowed(header, allowed), header
    for header in ("example.com", "localhost.example.com", "evil", "conveyor.example.com.x"):
        assert not host_allowed(header, allowed), header
    wrong_names = ("http://x.example", "x.example:80", "x.example/path", "", "a b", "x_y.example")
    for wrong in (*wrong_names, "é.example", "-x.example", "x" * 64 + ".example"):
        with pytest.raises(ValidationError, match="not a host name"):
            allowed_names([wrong])


@pytest.mark.parametrize(
    ("method", "headers", "refused"),
    [
        ("GET", {"sec-fetch-site": "cross-site"}, False),
        ("POST", {}, False),
        ("POST", {"sec-fetch-site": "same-origin", "origin": "null"}, False),
        ("POST", {"sec-fetch-site": "none"}, False),
        ("POST", {"origin": "http://h:1", "host": "h:1"}, False),
        ("POST", {"origin": "http://H:1", "host": "h:1"}, False),
        ("DELETE", {"sec-fetch-site": "same-site"}, True),
        ("PATCH", {"sec-fetch-site": "cross-site"}, True),
        ("PUT", {"origin": "http://other:1", "host": "h:1"}, True),
        ("POST", {"origin": "null", "host": "h:1"}, True),
        ("POST", {"origin": "file://h:1", "host": "h:1"}, True),
        ("POST", {"origin": "http://[::1", "host": "h:1"}, True),
    ],
)
def test_state_changing_requests_of_other_sites(
    method: str, headers: dict[str, str], refused: bool
) -> None:
    assert (cross_site(method, Headers(headers)) is not None) == refused


def test_a_token_is_long_enough_to_resist_guessing() -> None:
    for short in ("Q", "Qz7" * 5):
        with pytest.raises(ConflictError, match="at least 16 characters") as caught:
            check_token(short)
        assert short not in str(caught.value)
    check_token("a" * 16)
    check_token(None)


def test_login_attempts_are_counted_per_address_in_a_sliding_window() -> None:
    now = [1000.0]
    attempts = LoginAttempts(3, 60.0, clock=lambda: now[0], max_addresses=2)
    for _ in range(3):
        assert attempts.wait_s("a") == 0
        attempts.failed("a")
        now[0] += 10
    assert attempts.wait_s("a") == 30  # the first failure is 30 s from leaving the window
    assert attempts.wait_s("b") == 0
    now[0] += 30
    assert attempts.wait_s("a") == 0
    attempts.failed("b")
    attempts.failed("c")  # a third address: the least recent one is forgotten
    attempts.failed("c")
    attempts.failed("c")
    assert attempts.wait_s("c") > 0 and attempts.wait_s("a") == 0
