"""Who may talk to the server: loopback by default, a bearer token beyond it.

With a token, every API route needs ``Authorization: Bearer <token>``; the dashboard asks for
the token once and then keeps a cookie that proves it was given (an HMAC of the token, never
the token itself), so a page or its live updates never carry the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi import Request

from conveyor.contracts import ConflictError
from conveyor.service.api.errors import LoginRequired, Unauthorized
from conveyor.service.api.state import settings_of

TOKEN_ENV = "CONVEYOR_SERVER_TOKEN"
MIN_TOKEN_LENGTH = 16
"""Characters a token has at least; a short one can be guessed (``/login`` is rate-limited,
but the API's bearer check is not)."""
SESSION_COOKIE = "conveyor_session"
SESSION_MAX_AGE_S = 7 * 24 * 3600


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: the API runs submitted code."""
    if not is_loopback(host) and not token:
        raise ConflictError(
            f"refusing to listen on {host!r} without a token: anyone who reaches the server "
            f"could run code through it. Set {TOKEN_ENV} to a long random value, or keep the "
            "default --host 127.0.0.1"
        )


def check_token(token: str | None) -> None:
    """Refuse a token short enough to guess; never repeat it in the message."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConflictError(
            f"the token in {TOKEN_ENV} has {len(token)} characters; use at least "
            f"{MIN_TOKEN_LENGTH} characters of a random value, for example the output of: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def session_value(token: str) -> str:
    """The dashboard cookie's value for ``token``: proves the token was given, not what it is."""
    return hmac.new(token.encode(), b"conveyor dashboard session", hashlib.sha256).hexdigest()


def _bearer_ok(request: Request, token: str) -> bool:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and _same(value.strip(), token)


def session_ok(request: Request, token: str) -> bool:
    """A dashboard request is let in by its session cookie (or a bearer token, for scripts)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie is not None and _same(cookie, session_value(token))) or _bearer_ok(
        request, token
    )


def token_ok(given: str, token: str) -> bool:
    return _same(given, token)


async def require_token(request: Request) -> None:
    """Dependency of every API route: the bearer token, when the server has one."""
    token = settings_of(request).token
    if token is not None and not _bearer_ok(request, token):
        raise Unauthorized(
            "this server needs a token: send the header 'Authorization: Bearer <token>' with "
            f"the value of {TOKEN_ENV} that the server was started with"
        )


async def require_session(request: Request) -> None:
    """Dependency of every dashboard page: a session, when the server has a token."""
    token = settings_of(request).token
    if token is not None and not session_ok(request, token):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)


def safe_next(path: str | None) -> str:
    """Where to go after logging in: only a path on this server, never another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
