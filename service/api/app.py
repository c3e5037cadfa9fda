"""The ASGI app: the HTTP API, the dashboard, health and metrics, on one set of services.

``create_app()`` builds it; its lifespan opens the store and starts a ``Conveyor`` for the
served stack (on an embedded stack: the controller and a worker pool in this process), and
stops them on shutdown. Serve it with ``conveyor server up`` or any ASGI server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.contracts import ConveyorError
from conveyor.contracts.limits import DEFAULT_MAX_STEPS
from conveyor.service.api import (
    api_docs,
    dashboard,
    metrics,
    routes_artifacts,
    routes_code,
    routes_runs,
    routes_stacks,
    routes_users,
)
from conveyor.service.api.errors import RETRY_AFTER_S, LoginRequired, error_body, status_of
from conveyor.service.api.host_check import AllowedHosts, allowed_names
from conveyor.service.api.login_limit import LoginAttempts
from conveyor.service.api.origin_check import SameOriginWrites
from conveyor.service.api.pipeline_refs import TrustedPipelines
from conveyor.service.api.security import session_secret
from conveyor.service.api.state import ApiState, ServerSettings
from conveyor.service.api.submitted_code import (
    DEFAULT_MAX_CODE_BYTES,
    MAX_CODE_BYTES_CEILING,
    MAX_SPEC_BODY_BYTES,
)
from conveyor.service.bind_checks import check_token
from conveyor.service.gateway import RunGateway
from conveyor.service.home import Home
from conveyor.service.store.summaries import RunSummaries
from conveyor.service.version import conveyor_version
from conveyor.workers.loggers import get_logger

log = get_logger("conveyor.server")

JSON_PREFIXES = ("/api/", "/ui/", "/metrics", "/healthz", "/openapi.json")
MAX_BODY_BYTES = 1 << 20
"""The largest request body read: parameters, configurations and stack files are small."""
DESCRIPTION = """Stacks, components, flavors, pipelines, runs, steps and artifacts of one
Conveyor home. Errors are `{"error", "message", "status"}`: 404 for an unknown name or id,
409 when a rule refuses a change, 422 for invalid input, 401 without a user's valid token,
403 for another user's private record, an admin's task, a pipeline the server does not
compile or a request from another site's page, 413
for a body over 1 MiB (a submitted compiled pipeline: 16 MiB; a code archive: the server's
bound), or a pipeline over the server's step limit, 421 for a Host header
that is not the server's, 503 while a broker does not answer."""


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path == "/api" or path.startswith(JSON_PREFIXES)


def _error(request: Request, status: int, code: str, message: str) -> Response:
    if _wants_json(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(error_body(status, code, message), status, headers=headers)
    return dashboard.render(
        request, "error.html", status_code=status, title=f"{status}", status=status, message=message
    )


async def conveyor_error(request: Request, exc: Exception) -> Response:
    """The one handler of Conveyor's errors: 404, 409, 422, 401, 403 (see ``errors``)."""
    assert isinstance(exc, ConveyorError)
    if isinstance(exc, LoginRequired) and not _wants_json(request):
        return RedirectResponse(f"/login?next={quote(exc.next_path)}", status_code=303)
    status, code = status_of(exc)
    response = _error(request, status, code, exc.message)
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


async def invalid_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # The given input is left out: it may be huge, and Infinity or NaN cannot be JSON.
    errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
    problems = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems)
    if not _wants_json(request):
        return _error(request, 422, "invalid", message)
    body = error_body(422, "invalid", message) | {"detail": jsonable_encoder(errors)}
    return JSONResponse(body, status_code=422)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404 and message == "Not Found":
        message = f"nothing at {request.url.path}"
    elif exc.status_code == 413:
        # The routes that take long bodies have bounds of their own.
        most = {"/api/runs": MAX_SPEC_BODY_BYTES}.get(request.url.path, MAX_BODY_BYTES)
        if request.url.path.startswith("/api/code/"):
            most = MAX_CODE_BYTES_CEILING
        message = f"the request body is larger than {most} bytes, the most read"
    code = "not_found" if exc.status_code == 404 else "http_error"
    response = _error(request, exc.status_code, code, message)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: say so without details (they may hold paths or secrets); the log has them."""
    log.error("request failed", path=request.url.path, error=type(exc).__name__)
    return _error(
        request, 500, "internal", f"internal error ({type(exc).__name__}); see the server's log"
    )


class NoSniff:
    """Every response is what its Content-Type says, never sniffed into HTML."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with_header)


def create_app(
    home: str | Path | Home | None = None,
    *,
    stack: str | None = None,
    token: str | None = None,
    poll_interval_s: float = 0.5,
    record_timeout_s: float = 5.0,
    allowed_hosts: Sequence[str] = (),
    pipelines: str | Path | None = None,
    trusted_packages: Sequence[str] = (),
    max_steps: int = DEFAULT_MAX_STEPS,
    max_code_bytes: int = DEFAULT_MAX_CODE_BYTES,
) -> FastAPI:
    """The app for ``home``, serving ``stack`` (default: the active one).

    With a ``token``, every API route needs ``Authorization: Bearer <token>`` and the
    dashboard asks for it once. It answers to ``localhost``, IP addresses and the
    ``allowed_hosts``; it compiles pipelines from files under ``pipelines`` (default: the
    working directory) and from modules of the ``trusted_packages``, of ``max_steps`` steps
    at most. See ``docs/server.md``.
    """
    check_token(token or None)
    settings = ServerSettings(
        home=home if isinstance(home, Home) else Home.resolve(home),
        pipelines=TrustedPipelines.of(pipelines, trusted_packages),
        stack=stack,
        token=token or None,
        poll_interval_s=poll_interval_s,
        max_code_bytes=max_code_bytes,
        max_steps=max_steps,
    )
    hosts = allowed_names(allowed_hosts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = RunGateway(settings.home, record_timeout=record_timeout_s, max_steps=max_steps)
        try:
            await gateway.start(settings.stack)
            if settings.token is not None:
                # The server's token is its admin's: set (or reset) it on every start.
                await gateway.services.users.ensure_admin(settings.token)
            secret = await asyncio.to_thread(session_secret, settings.home)
            app.state.conveyor = ApiState(gateway, RunSummaries(gateway.services.db), secret)
            log.info("server started", stack=gateway.stack.name, home=str(settings.home.path))
            yield
        finally:
            app.state.conveyor = None
            await gateway.stop()

    app = FastAPI(
        title="Conveyor",
        version=conveyor_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.settings = settings
    app.state.conveyor = None
    app.state.login_attempts = LoginAttempts()
    app.add_exception_handler(ConveyorError, conveyor_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Starlette still raises the exception after this answer, so the server logs it.
    app.add_exception_handler(Exception, internal_error)
    # The last added runs first: a wrong Host is refused before anything else is looked at.
    app.add_middleware(SameOriginWrites)
    app.add_middleware(AllowedHosts, allowed=hosts)
    app.add_middleware(NoSniff)
    for router in (
        routes_stacks.router,
        routes_runs.router,
        routes_artifacts.router,
        routes_code.router,
        routes_users.router,
        metrics.router,
        dashboard.router,
        dashboard.pages,
    ):
        app.include_router(router)
    api_docs.add_api_docs(app)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app
