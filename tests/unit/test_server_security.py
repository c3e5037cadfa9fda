"""The server's rules of who may connect: loopback by default, a token beyond it."""

from __future__ import annotations

import pytest

from conveyor.contracts import ConflictError, ConveyorError, NotFoundError, ValidationError
from conveyor.service.api.errors import Forbidden, Unauthorized, status_of
from conveyor.service.api.security import (
    check_bind,
    is_loopback,
    safe_next,
    session_value,
)


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


def test_the_session_cookie_proves_the_token_without_holding_it() -> None:
    value = session_value("s3cret-token")
    assert "s3cret-token" not in value
    assert value == session_value("s3cret-token")
    assert value != session_value("other-token")


def test_each_error_class_has_its_status() -> None:
    assert status_of(NotFoundError("x"))[0] == 404
    assert status_of(ConflictError("x"))[0] == 409
    assert status_of(ValidationError("x"))[0] == 422
    assert status_of(Unauthorized("x"))[0] == 401
    assert status_of(Forbidden("x"))[0] == 403
    assert status_of(ConveyorError("x"))[0] == 400
    assert status_of(ConveyorError("broker down", retryable=True))[0] == 503
