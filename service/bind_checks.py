"""Whom ``conveyor server up`` may listen for, checked before anything heavy is imported: a
bind beyond loopback needs the admin's token, and a token must be long enough not to guess.

No web framework here: ``server up`` refuses a bad bind in a fraction of the time that
importing the HTTP app takes (``service.api.security`` uses these same checks).
"""

from __future__ import annotations

import ipaddress
import os

from conveyor.contracts import ConflictError

TOKEN_ENV = "CONVEYOR_SERVER_TOKEN"
ADMIN_TOKEN_ENV = "CONVEYOR_ADMIN_TOKEN"
MIN_TOKEN_LENGTH = 16
"""Characters a token has at least; a short one can be guessed (``/login`` is rate-limited,
but the API's bearer check is not)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_token() -> str | None:
    """The admin's token given to ``server up``: $CONVEYOR_ADMIN_TOKEN, else (as before users
    existed) $CONVEYOR_SERVER_TOKEN; with one, every request needs a user's token."""
    return os.environ.get(ADMIN_TOKEN_ENV) or os.environ.get(TOKEN_ENV) or None


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token: the API runs submitted code."""
    if not is_loopback(host) and not token:
        raise ConflictError(
            f"refusing to listen on {host!r} without a token: anyone who reaches the server "
            f"could run code through it. Set {ADMIN_TOKEN_ENV} (or {TOKEN_ENV}) to a long random "
            "value, the admin's token, or keep the "
            "default --host 127.0.0.1"
        )


def check_token(token: str | None) -> None:
    """Refuse a token short enough to guess; never repeat it in the message."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ConflictError(
            f"the token in {ADMIN_TOKEN_ENV} or {TOKEN_ENV} has {len(token)} characters; use at "
            f"least {MIN_TOKEN_LENGTH} characters of a random value, for example the output of: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
