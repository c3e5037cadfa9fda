"""Who may talk to the server, and as which user: a user's bearer token, or on loopback
without a server token, the local admin.

Every API route takes ``Authorization: Bearer <token>`` of a user (``service.users``); a
wrong, rotated or deleted user's token gets 401, always. A request without a token acts as
the local admin, ``default``, only when the server was started without a token (then it
listens on loopback only, as before users existed). The dashboard asks for a token once and
then keeps a cookie that proves it was given (an HMAC, never the token itself), so a page or
its live updates never carry the secret. The HMAC's server secret is kept in the server's
home, so that a session outlives a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from fastapi import Depends, Request

from conveyor.contracts import ConveyorError
from conveyor.service.api.errors import LoginRequired, Unauthorized
from conveyor.service.api.state import settings_of, state_of
from conveyor.service.context import Services
from conveyor.service.home import Home
from conveyor.service.users import LOCAL_ADMIN, Actor, actor_of

SESSION_COOKIE = "conveyor_session"
SESSION_MAX_AGE_S = 7 * 24 * 3600
SESSION_SECRET_FILE = "dashboard-secret"
"""The file in the server's home that holds the key of the dashboard's session cookies."""
SESSION_SECRET_BYTES = 32


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def session_secret(home: Home) -> bytes:
    """The server's key of dashboard sessions, made on first use and kept in ``home`` (mode
    0600, as the login file), so that a restart does not log everyone out; blocking I/O."""
    path = home.path / SESSION_SECRET_FILE
    if not path.exists():
        home.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staged.unlink(missing_ok=True)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(SESSION_SECRET_BYTES) + "\n")
        try:
            # A link never replaces a file: of two servers starting at once, both keep the
            # first one's secret, and no reader sees half a file.
            os.link(staged, path)
        except FileExistsError:
            pass
        finally:
            staged.unlink()
    try:
        return bytes.fromhex(path.read_text())
    except (OSError, ValueError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "it is not a hex key"
        raise ConveyorError(
            f"cannot read the dashboard's session key {path}: {problem}; delete the file to "
            "make a new one (everyone then logs in to the dashboard again)"
        ) from None


def session_value(secret: bytes, name: str, key: bytes) -> str:
    """The dashboard cookie's value for user ``name``: their name and an HMAC keyed by the
    server's secret and the digest of their token, so it proves a login without holding the
    token, and stops working when the token is rotated or the user deleted."""
    mac = hmac.new(secret + key, f"conveyor dashboard session:{name}".encode(), hashlib.sha256)
    return f"{name}.{mac.hexdigest()}"


def _bearer(request: Request) -> str | None:
    """The bearer token of ``request``, or None when it sends no Authorization header."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    # A malformed header is a wrong token, never "no token" (which may act as the admin).
    return value.strip() if scheme.lower() == "bearer" else ""


async def _token_user(request: Request, token: str) -> Actor | None:
    user = await state_of(request).services.users.authenticate(token)
    return actor_of(user) if user is not None else None


async def _session_user(request: Request) -> Actor | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or len(cookie) > 300:
        return None
    name, _, _ = cookie.rpartition(".")
    services = state_of(request).services
    key = await services.users.session_key(name)
    if key is None or not _same(cookie, session_value(state_of(request).secret, name, key)):
        return None
    return actor_of(await services.users.get(name))


def _anonymous(request: Request) -> Actor | None:
    """Who a request without a token acts as: the local admin on a server that needs no
    token (loopback, started without one, as before users existed), else nobody."""
    return LOCAL_ADMIN if settings_of(request).token is None else None


async def require_user(request: Request) -> Actor:
    """Dependency of every API route: the user of the request's bearer token (401 for a
    wrong, expired, rotated or deleted one), or without a token the local admin where allowed."""
    token = _bearer(request)
    actor = await _token_user(request, token) if token is not None else _anonymous(request)
    if actor is None:
        raise Unauthorized(
            "this server needs a user's token: send the header 'Authorization: Bearer <token>' "
            "(conveyor login URL keeps one for the CLI); an expired or rotated token, or a "
            "deleted user's, no longer works"
        )
    request.state.actor = actor
    return actor


async def require_session(request: Request) -> Actor:
    """Dependency of every dashboard page: the logged-in user (by session cookie, or a
    bearer token, for scripts), or the local admin where no token is needed."""
    token = _bearer(request)
    if token is not None:
        # A script that sent a wrong token is told so, not sent to a login form.
        actor = await _token_user(request, token)
        if actor is None:
            raise Unauthorized("the bearer token is not a user's token on this server")
    else:
        actor = await _session_user(request) or _anonymous(request)
    if actor is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    request.state.actor = actor
    return actor


async def api_services(request: Request, actor: Actor = Depends(require_user)) -> Services:
    """Dependency: the server's services acting for the request's user."""
    return state_of(request).services.as_user(actor)


async def page_services(request: Request, actor: Actor = Depends(require_session)) -> Services:
    """Dependency of dashboard pages: the server's services acting for the logged-in user."""
    return state_of(request).services.as_user(actor)


def safe_next(path: str | None) -> str:
    """Where to go after logging in: only a path on this server, never another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
