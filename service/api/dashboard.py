"""The dashboard: server-rendered pages of stacks, runs and artifacts, and the login form.

The run page polls ``/ui/runs/{id}/state`` (the same ``RunDetail`` it was rendered from)
until the run finishes; polling rather than server-sent events keeps every request short,
so a shutdown never waits on an open stream, and works with the session cookie as is.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as FastAPIPath
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from conveyor.contracts import NotFoundError, RunStatus, StepStatus
from conveyor.contracts.models import MAX_NAME_LENGTH
from conveyor.service.api import views
from conveyor.service.api.artifact_files import (
    download_response,
    open_artifact,
    preview_artifact,
    read_logs,
)
from conveyor.service.api.dag import layout
from conveyor.service.api.login_limit import LOGIN_ATTEMPTS, LOGIN_WINDOW_S
from conveyor.service.api.run_chart import CHART_RUNS, RunChart, run_chart
from conveyor.service.api.schemas import Paging
from conveyor.service.api.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    page_services,
    require_session,
    safe_next,
    session_value,
)
from conveyor.service.api.state import ApiState, login_attempts_of, settings_of, state_of
from conveyor.service.context import Services
from conveyor.workers.loggers import get_logger
from conveyor.workers.stack_probes import queue_report

log = get_logger("conveyor.server")

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
MAX_LOGIN_BODY = 4096
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATUS_ORDER = [s.value for s in StepStatus]


def seconds(value: float | None) -> str:
    """A duration as the CLI prints it: 250ms, 3.20s."""
    if value is None:
        return "—"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def clock(value: datetime | None) -> str:
    """A moment's time of day in UTC, to the millisecond (as the run page's script writes it)."""
    return value.strftime("%H:%M:%S.%f")[:-3] if value else "—"


def size(value: int) -> str:
    """A byte count for people: 812 B, 3.4 KiB."""
    if value < 1024:
        return f"{value} B"
    amount, unit = float(value), "B"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 (the unit it stops at is the answer)
        amount /= 1024
        if amount < 1024:
            break
    return f"{amount:.1f} {unit}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["seconds"] = seconds
    env.filters["size"] = size
    env.filters["when"] = lambda v: v.strftime("%Y-%m-%d %H:%M:%S UTC") if v else "—"
    env.filters["clock"] = clock
    return env


templates = Jinja2Templates(env=_environment())
router = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, dependencies=[Depends(require_session)])


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page with the dashboard's security headers."""
    settings = settings_of(request)
    context.setdefault("auth", settings.token is not None)
    # Who is logged in (set by the session check; error pages may have nobody).
    context.setdefault("user", getattr(request.state, "actor", None))
    context.setdefault("title", "Conveyor")
    return templates.TemplateResponse(
        request, name, context, status_code=status_code, headers=HEADERS
    )


@pages.get("/", response_class=HTMLResponse)
async def stacks_page(
    request: Request,
    state: ApiState = Depends(state_of),
    services: Services = Depends(page_services),
) -> HTMLResponse:
    stacks = await views.stack_views(services)
    return render(
        request,
        "stacks.html",
        title="Stacks",
        stacks=stacks,
        types=views.COMPONENT_ORDER,
        served=state.gateway.stack.name,
    )


async def _chart(
    services: Services, *, stack_id: str | None = None, pipeline: str | None = None
) -> RunChart:
    latest = await services.runs.list_runs(stack_id=stack_id, pipeline=pipeline, limit=CHART_RUNS)
    return run_chart(latest, [views.elapsed(r) for r in latest])


UNFINISHED = (RunStatus.QUEUED, RunStatus.PENDING, RunStatus.RUNNING)
"""Runs whose row the page refreshes as they go."""


@pages.get("/stacks/{name}", response_class=HTMLResponse)
async def stack_page(
    request: Request,
    name: str = FastAPIPath(max_length=MAX_NAME_LENGTH),
    paging: Paging = Depends(),
    services: Services = Depends(page_services),
) -> HTMLResponse:
    stack = await views.stack_view(services, name)
    runs = await views.runs_page(services, paging, stack=stack.name)
    return render(
        request,
        "stack.html",
        title=f"Stack {stack.name}",
        stack=stack,
        types=[t for t in views.COMPONENT_ORDER if t in stack.components],
        runs=runs,
        chart=await _chart(services, stack_id=stack.id),
        queues=await queue_report(await services.stacks.get(stack.name)),
        elapsed=views.elapsed,
        active_statuses=UNFINISHED,
    )


@pages.get("/pipelines/{name:path}", response_class=HTMLResponse)
async def pipeline_page(
    request: Request,
    name: str = FastAPIPath(max_length=MAX_NAME_LENGTH),
    paging: Paging = Depends(),
    state: ApiState = Depends(state_of),
) -> HTMLResponse:
    summary = await views.pipeline_summary(state.summaries, name)
    runs = await views.runs_page(state.services, paging, pipeline=summary.name)
    return render(
        request,
        "pipeline.html",
        title=f"Pipeline {summary.name}",
        pipeline=summary,
        runs=runs,
        chart=await _chart(state.services, pipeline=summary.name),
        elapsed=views.elapsed,
        active_statuses=UNFINISHED,
    )


@pages.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(
    request: Request, run_id: str, state: ApiState = Depends(state_of)
) -> HTMLResponse:
    detail = await views.run_detail(state.services, run_id)
    graph = layout([(s.name, s.upstream) for s in detail.steps])
    spec = await state.services.runs.spec_of(detail.run.id)
    return render(
        request,
        "run.html",
        title=f"Run {detail.run.id[:8]}",
        detail=detail,
        run=detail.run,
        graph=graph,
        labels=views.edge_labels(spec),
        steps={s.name: s for s in detail.steps},
        interval_ms=int(settings_of(request).poll_interval_s * 1000),
        status_order=STATUS_ORDER,
    )


@pages.get("/ui/runs/{run_id}/state", response_model=views.RunDetail)
async def run_state(run_id: str, state: ApiState = Depends(state_of)) -> views.RunDetail:
    """What the run page polls for while the run is going."""
    return await views.run_detail(state.services, run_id)


@pages.get("/ui/runs/{run_id}/logs", response_class=PlainTextResponse)
async def step_logs(
    run_id: str,
    step: str = Query(min_length=1, max_length=MAX_NAME_LENGTH),
    state: ApiState = Depends(state_of),
) -> PlainTextResponse:
    """What a step's last attempt printed and logged, as plain text."""
    found = await views.step_of(state.services, run_id, step)
    if found.logs is None:
        raise NotFoundError(f"step {step!r} of run {found.run_id} has no logs yet")
    run = await state.services.runs.get_run(found.run_id)
    return PlainTextResponse(await read_logs(run, found.logs), headers=HEADERS)


@pages.get("/artifacts/{artifact_id}", response_class=HTMLResponse)
async def artifact_page(
    request: Request, artifact_id: str, state: ApiState = Depends(state_of)
) -> HTMLResponse:
    artifact = await state.services.artifacts.get_artifact(artifact_id)
    preview = await preview_artifact(state.services, artifact.id)
    run = await state.services.runs.get_run(artifact.run_id)
    return render(
        request,
        "artifact.html",
        title=f"Artifact {views.artifact_title(artifact)}",
        artifact=artifact,
        preview=preview,
        run=run,
    )


@pages.get("/artifacts/{artifact_id}/download")
async def artifact_download(artifact_id: str, state: ApiState = Depends(state_of)) -> Response:
    return download_response(await open_artifact(state.services, artifact_id))


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/") -> Response:
    if settings_of(request).token is None:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html", title="Log in", next=safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token once; a session cookie carries proof of it from then on."""
    if settings_of(request).token is None:
        return RedirectResponse("/", status_code=303)
    body = await request.body()
    fields = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", errors="replace"))
    given = fields.get("token", [""])[0]
    target = safe_next(fields.get("next", ["/"])[0])
    attempts = login_attempts_of(request)
    address = request.client.host if request.client else "unknown"
    wait_s = attempts.wait_s(address)
    if wait_s:
        refused = render(
            request,
            "login.html",
            status_code=429,
            title="Log in",
            next=target,
            error=f"Too many failed attempts from your address (at most {LOGIN_ATTEMPTS} "
            f"in {LOGIN_WINDOW_S:g} seconds): try again in {wait_s} seconds.",
        )
        refused.headers["Retry-After"] = str(wait_s)
        return refused
    users = state_of(request).services.users
    user = await users.authenticate(given)
    key = await users.session_key(user.name) if user is not None else None
    if user is None or key is None:
        attempts.failed(address)
        if wait_s := attempts.wait_s(address):
            log.warning("too many failed logins: address refused", client=address, wait_s=wait_s)
        return render(
            request,
            "login.html",
            status_code=401,
            title="Log in",
            next=target,
            error="That is not the token of a user of this server.",
        )
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_value(state_of(request).secret, user.name, key),
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
