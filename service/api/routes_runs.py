"""``/api/runs`` (with their steps) and ``/api/pipelines``: read, submit, cancel, delete."""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from conveyor.contracts import (
    NotFoundError,
    PipelineSpec,
    RunRecord,
    RunStatus,
    StackSpec,
    StepRecord,
    ValidationError,
)
from conveyor.contracts.models import MAX_NAME_LENGTH
from conveyor.service.api import views
from conveyor.service.api.artifact_files import read_logs
from conveyor.service.api.errors import Forbidden
from conveyor.service.api.schemas import CancelRun, Page, Paging, SubmitRun
from conveyor.service.api.security import api_services, require_user
from conveyor.service.api.state import ApiState, settings_of, state_of
from conveyor.service.api.submitted_code import (
    MAX_SPEC_BODY_BYTES,
    check_spec,
    runs_in_the_server,
    stacks_for_code,
    trusted_packages,
)
from conveyor.service.context import Services
from conveyor.service.gateway import Submission
from conveyor.service.public_records import public_run, public_spec
from conveyor.service.run_retries import check_retryable
from conveyor.service.store.summaries import PipelineSummary
from conveyor.service.users import Actor, code_refused
from conveyor.service.version import conveyor_version, incompatible
from conveyor.workers.flavors import make_artifact_store

router = APIRouter(prefix="/api", dependencies=[Depends(require_user)])

IDEMPOTENCY_HEADER = "Idempotency-Key"


@router.get("/runs", response_model=Page[RunRecord], tags=["runs"])
async def list_runs(
    stack: str | None = None,
    pipeline: str | None = None,
    status: RunStatus | None = None,
    user: str | None = Query(None, max_length=100, description="Only runs this user submitted"),
    paging: Paging = Depends(),
    services: Services = Depends(api_services),
) -> Page[RunRecord]:
    """Runs, newest first; filter by stack, pipeline, status and who submitted them."""
    return await views.runs_page(
        services, paging, stack=stack, pipeline=pipeline, status=status, user=user
    )


@router.post(
    "/runs",
    response_model=RunRecord,
    status_code=201,
    tags=["runs"],
    responses={
        200: {"model": RunRecord, "description": "The run this idempotency key created before"},
        202: {"model": RunRecord, "description": "Requested; the controller has not yet answered"},
    },
    # A compiled pipeline of many steps is longer than the app's 1 MiB.
    max_body_size=MAX_SPEC_BODY_BYTES,
)
async def submit_run(
    body: SubmitRun,
    request: Request,
    response: Response,
    idempotency_key: str | None = Header(
        None,
        alias=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=255,
        description="The same key twice creates one run",
    ),
    state: ApiState = Depends(state_of),
    actor: Actor = Depends(require_user),
) -> RunRecord:
    """Start a run of a pipeline; returns once the controller has recorded it.

    Either ``pipeline``: the server compiles files under its pipelines folder and modules of
    the packages it trusts (403 for any other reference). Or ``spec``: a pipeline the client
    compiled, each step's code an archive uploaded to the stack's store first (``PUT
    /api/code/{digest}``, 422 if the store lacks it) or a module of a trusted package (403
    else); it runs on a service stack's workers, never inside the server (403 on an embedded
    stack, but for an admin). Either way at most the server's step limit (413)."""
    if idempotency_key and body.idempotency_key and idempotency_key != body.idempotency_key:
        raise ValidationError(
            f"the {IDEMPOTENCY_HEADER} header and the body's idempotency_key differ"
        )
    key = idempotency_key or body.idempotency_key
    pipeline = settings_of(request).pipelines.checked(body.pipeline) if body.pipeline else None
    # A user runs on the stacks they may see (the served one unless they name another).
    target = await state.gateway.stack_named(state.services.as_user(actor).stacks, body.stack)
    if body.spec is not None:
        submission = await _submit_spec(body.spec, body, target, key, request, state, actor)
    else:
        assert pipeline is not None
        submission = await state.gateway.submit(
            pipeline, body.parameters, stack=target.name, idempotency_key=key, cache=body.cache
        )
    await state.services.runs.attribute(submission.run.id, actor.name)
    run = await _attributed(state.services, submission.run)
    response.headers["Location"] = f"/api/runs/{submission.run.id}"
    if not submission.recorded:
        response.status_code = 202
    elif not submission.created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return public_run(run)


async def _submit_spec(
    spec: PipelineSpec,
    body: SubmitRun,
    target: StackSpec,
    key: str | None,
    request: Request,
    state: ApiState,
    actor: Actor,
) -> Submission:
    _check_client_version(request.headers.get("user-agent", ""))
    if runs_in_the_server(target) and not actor.admin:
        visible = await state.services.as_user(actor).stacks.list_stacks()
        raise Forbidden(code_refused(target.name, stacks_for_code(visible, admin=False)))
    settings = settings_of(request)
    await check_spec(
        spec,
        stack=target,
        store=make_artifact_store(target),
        archives=state.archives,
        trusted=trusted_packages(target, settings.pipelines.packages),
        max_steps=settings.max_steps,
    )
    if body.retry_of is not None:
        check_retryable(await _changeable(state.services, actor, body.retry_of))
    return await state.gateway.submit_spec(
        spec, stack=target.name, idempotency_key=key, cache=body.cache, retry_of=body.retry_of
    )


def _check_client_version(user_agent: str) -> None:
    """A spec compiled by a conveyor of another major version may not mean what this
    server reads in it: refuse it, saying which versions differ."""
    product, _, version = user_agent.partition(" ")[0].partition("/")
    if product != "conveyor" or not version:
        return  # another HTTP client: the spec's validation is the only check
    problem = incompatible(version, conveyor_version())
    if problem:
        raise ValidationError(problem)


async def _attributed(services: Services, run: RunRecord) -> RunRecord:
    """``run`` as recorded now, with its submitter (the first one, for a replayed key)."""
    try:
        return await services.runs.get_run(run.id)
    except NotFoundError:  # a request taken by no controller yet, and forgotten since
        return run


@router.get("/runs/{run_id}", response_model=RunRecord, tags=["runs"])
async def get_run(run_id: str, state: ApiState = Depends(state_of)) -> RunRecord:
    """A run (a unique prefix of its id is enough)."""
    return public_run(await state.services.runs.get_run(run_id))


@router.get("/runs/{run_id}/spec", response_model=PipelineSpec, tags=["runs"])
async def get_spec(
    run_id: str, state: ApiState = Depends(state_of), actor: Actor = Depends(require_user)
) -> PipelineSpec:
    """The DAG a run runs, as it was compiled (a retry compiles its reference again); its
    ``folder`` (where it was compiled) only for the run's submitter and admins."""
    run = await state.services.runs.get_run(run_id)
    return public_spec(await state.services.runs.spec_of(run.id), run, actor)


@router.get(
    "/runs/{run_id}/events",
    tags=["runs"],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_run(
    run_id: str, request: Request, state: ApiState = Depends(state_of)
) -> StreamingResponse:
    """Follow a run live (server-sent events): ``event: step`` with a ``StepStatusChanged``
    for each step change, then ``event: run`` with the finished run's record; the stream
    ends there. A client that reconnects is sent the steps' current statuses again."""
    run = await state.services.runs.get_run(run_id)
    events = state.watches.events(
        state.services, run.id, settings_of(request).poll_interval_s, request.is_disconnected
    )
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/runs/{run_id}/cancel", response_model=RunRecord, status_code=202, tags=["runs"])
async def cancel_run(
    run_id: str,
    body: CancelRun | None = Body(None),
    state: ApiState = Depends(state_of),
    actor: Actor = Depends(require_user),
) -> RunRecord:
    """Cancel a pending or running run (409 if it finished already); its submitter or an
    admin (403 for others)."""
    run = await _changeable(state.services, actor, run_id)
    reason = body.reason if body is not None else CancelRun().reason
    return public_run(await state.gateway.cancel(run.id, reason))


@router.post("/runs/{run_id}/retry", response_model=RunRecord, status_code=201, tags=["runs"])
async def retry_run(
    run_id: str,
    request: Request,
    response: Response,
    state: ApiState = Depends(state_of),
    actor: Actor = Depends(require_user),
) -> RunRecord:
    """Run a failed or cancelled run again (409 otherwise): the same pipeline and parameters
    on the same stack, compiled from the code as it is now; the steps that completed there
    with unchanged code, parameters and inputs are reused. The new run's ``retry_of``
    names this one. Its submitter or an admin retries it (403 for others)."""
    run = await _changeable(state.services, actor, run_id)
    check_retryable(run)
    await state.services.as_user(actor).stacks.get(run.stack_name)
    spec = await state.services.runs.spec_of(run.id)
    if not spec.ref:
        raise ValidationError(f"run {run.id} names no pipeline reference to compile again")
    pipeline = settings_of(request).pipelines.checked(spec.ref)
    submission = await state.gateway.submit(
        pipeline, dict(run.parameters), stack=run.stack_name, retry_of=run.id
    )
    await state.services.runs.attribute(submission.run.id, actor.name)
    response.headers["Location"] = f"/api/runs/{submission.run.id}"
    if not submission.recorded:
        response.status_code = 202
    return public_run(await _attributed(state.services, submission.run))


@router.delete("/runs/{run_id}", status_code=204, tags=["runs"])
async def delete_run(
    run_id: str, state: ApiState = Depends(state_of), actor: Actor = Depends(require_user)
) -> Response:
    """Delete a finished run's records (409 while it is going); its artifacts stay. Its
    submitter or an admin deletes it (403 for others)."""
    run = await _changeable(state.services, actor, run_id)
    await state.services.runs.delete_run(run.id)
    return Response(status_code=204)


async def _changeable(services: Services, actor: Actor, run_id: str) -> RunRecord:
    """The run ``run_id`` if ``actor`` may cancel, retry or delete it."""
    run = await services.runs.get_run(run_id)
    actor.check_change(f"run {run.id}", run.user)
    return run


@router.get("/runs/{run_id}/steps", response_model=list[StepRecord], tags=["steps"])
async def list_steps(run_id: str, state: ApiState = Depends(state_of)) -> list[StepRecord]:
    """Every step of a run, in pipeline order."""
    run = await state.services.runs.get_run(run_id)
    return await state.services.runs.steps_of(run.id)


@router.get("/runs/{run_id}/steps/{step}", response_model=StepRecord, tags=["steps"])
async def get_step(run_id: str, step: str, state: ApiState = Depends(state_of)) -> StepRecord:
    return await views.step_of(state.services, run_id, step)


@router.get("/runs/{run_id}/logs", response_model=dict[str, str], tags=["steps"])
async def run_logs(
    run_id: str,
    step: str | None = Query(None, min_length=1, max_length=MAX_NAME_LENGTH),
    state: ApiState = Depends(state_of),
) -> dict[str, str]:
    """What each step's last attempt printed and logged, by step name, in DAG order."""
    run = await state.services.runs.get_run(run_id)
    steps = [s for s in await state.services.runs.steps_of(run.id) if step in (None, s.name)]
    if step is not None and not steps:
        raise NotFoundError(f"run {run.id} has no step {step!r}")
    return {s.name: await read_logs(run, s.logs) for s in steps if s.logs is not None}


@router.get("/pipelines", response_model=Page[PipelineSummary], tags=["pipelines"])
async def list_pipelines(
    paging: Paging = Depends(), state: ApiState = Depends(state_of)
) -> Page[PipelineSummary]:
    """Every pipeline that ran, the most recently run first."""
    found = await state.summaries.pipelines(limit=paging.limit + 1, offset=paging.offset)
    return paging.page(found)


@router.get("/pipelines/{name}", response_model=PipelineSummary, tags=["pipelines"])
async def get_pipeline(name: str, state: ApiState = Depends(state_of)) -> PipelineSummary:
    return await views.pipeline_summary(state.summaries, name)


@router.get("/pipelines/{name}/runs", response_model=Page[RunRecord], tags=["pipelines"])
async def pipeline_runs(
    name: str,
    status: RunStatus | None = None,
    paging: Paging = Depends(),
    state: ApiState = Depends(state_of),
) -> Page[RunRecord]:
    """The runs of one pipeline, newest first."""
    await views.pipeline_summary(state.summaries, name)
    return await views.runs_page(state.services, paging, pipeline=name, status=status)
