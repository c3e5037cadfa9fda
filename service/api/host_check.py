"""The Host allow-list: the server answers only to names it was told are its own.

A web page whose name an attacker points at 127.0.0.1 (DNS rebinding) reaches a loopback
server with the attacker's name in the ``Host`` header; refusing names the server does not go
by stops it before any route runs. IP addresses are always accepted: a page can only be *at*
an IP address by being served from it, so such a page is the server itself. Names are
``localhost`` and those given with ``conveyor server up --allowed-host``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.contracts import ValidationError
from conveyor.service.api.errors import error_body

LOOPBACK_NAMES = frozenset({"localhost"})
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
SHOWN_MAX = 100


def host_name(header: str) -> str | None:
    """The name or address in a ``Host`` header (lower case, no port); None if malformed."""
    if header.startswith("["):
        address, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(address))
        except ValueError:
            return None
    name, colon, port = header.partition(":")
    if not name or (colon and not port.isdigit()):
        return None
    return name.lower()


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    """Whether a request with this ``Host`` header is meant for this server."""
    name = host_name(header)
    if name is None:
        return False
    return name in LOOPBACK_NAMES or name in allowed or _ip(name)


def _ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_names(names: Iterable[str]) -> frozenset[str]:
    """The configured names, checked: a name, without scheme, port or path."""
    checked = set()
    for name in names:
        found = host_name(name)
        if found is None or found != name.lower() or not (_DNS_NAME.fullmatch(found) or _ip(found)):
            raise ValidationError(
                f"allowed host {name!r} is not a host name: give a name like "
                "conveyor.example.com, without scheme, port or path"
            )
        checked.add(found)
    return frozenset(checked)


class AllowedHosts:
    """Answer 421 to a request whose ``Host`` is not one of this server's names."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host", "")
        if host_allowed(header, self.allowed):
            await self.app(scope, receive, send)
            return
        shown = header if len(header) <= SHOWN_MAX else header[:SHOWN_MAX] + "..."
        message = (
            f"this server does not answer to the host {shown!r}: it answers to localhost, "
            "IP addresses, and the names it was started with (conveyor server up "
            "--allowed-host NAME)"
        )
        await JSONResponse(error_body(421, "misdirected", message), 421)(scope, receive, send)
