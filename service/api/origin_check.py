"""Origin checks: a request that changes something must not come from another site's page.

A browser sends a page's requests to any server, with the user's cookies, and a POST without
a body (or with a form or text body) needs no CORS preflight: without this check, any web
page could cancel runs or switch the active stack of a server on 127.0.0.1 (CSRF). Browsers
say where a request comes from in ``Sec-Fetch-Site`` and ``Origin``, headers a page cannot
set. A state-changing request is refused when they name another origin (the rule of Go's
``http.CrossOriginProtection``); clients that are not browsers (curl, the SDK, scripts with
a token) send neither and are let through.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.service.api.errors import error_body

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})
"""``Sec-Fetch-Site`` values of a request of this server's own pages, or typed by the user."""


def _same_origin(origin: str, host: str) -> bool:
    if origin == "null":
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def cross_site(method: str, headers: Headers) -> str | None:
    """Why a request must be refused as coming from another site's page, or None.

    ``Sec-Fetch-Site`` decides when a browser sent it; ``Origin`` only for browsers without
    it. (A form of a page served with ``Referrer-Policy: no-referrer``, as the dashboard's
    are, is posted with ``Origin: null`` even to its own server.)
    """
    if method not in STATE_CHANGING:
        return None
    site = headers.get("sec-fetch-site")
    if site is not None:
        return None if site in SAME_ORIGIN_SITES else f"Sec-Fetch-Site is {site!r}"
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, headers.get("host", "")):
        shown = origin if len(origin) <= 100 else origin[:100] + "..."
        return f"Origin is {shown!r}"
    return None


class SameOriginWrites:
    """Answer 403 to a POST, PUT, PATCH or DELETE that a page of another site sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = cross_site(scope["method"], Headers(scope=scope))
        if why is None:
            await self.app(scope, receive, send)
            return
        message = (
            f"refused: this request comes from a page of another site ({why}); change "
            "things from the dashboard, the CLI or the API without a browser"
        )
        await JSONResponse(error_body(403, "cross_site", message), 403)(scope, receive, send)
