"""What the API and the dashboard show: records with every secret masked, and run details.

Every stack, component and run snapshot leaves the server through ``public_records``, which
the CLI's ``--output json`` uses too: one shape per record.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    FINISHED_STEP_STATUSES,
    ArtifactRecord,
    ComponentSpec,
    ComponentType,
    NotFoundError,
    PipelineSpec,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
    ValidationError,
    utcnow,
)
from conveyor.service.api.schemas import Page, Paging
from conveyor.service.api.timeline import Bar, timeline
from conveyor.service.context import Services
from conveyor.service.public_records import (
    ComponentView,
    FlavorInfo,
    StackView,
    flavor_info,
    public_component,
    public_run,
    public_stack,
)
from conveyor.service.store.summaries import PipelineSummary, RunSummaries
from conveyor.workers.flavors import get_flavor

COMPONENT_ORDER = sorted(ComponentType, key=lambda t: t.value)


def flavor_named(type_: ComponentType, name: str) -> FlavorInfo:
    """The flavor ``name`` of ``type_``; unknown is a 404 here, not invalid input."""
    try:
        return flavor_info(get_flavor(type_, name))
    except ValidationError as exc:
        raise NotFoundError(str(exc)) from None


async def runs_page(
    services: Services,
    paging: Paging,
    *,
    stack: str | None = None,
    pipeline: str | None = None,
    status: RunStatus | None = None,
    user: str | None = None,
) -> Page[RunRecord]:
    """Runs, newest first, filtered by stack name (or id), pipeline, status and submitter."""
    runs = await services.list_runs(
        stack=stack,
        pipeline=pipeline,
        status=status,
        user=user,
        limit=paging.limit + 1,
        offset=paging.offset,
    )
    return paging.page([public_run(r) for r in runs])


async def pipeline_summary(summaries: RunSummaries, name: str) -> PipelineSummary:
    """A pipeline that ran, by name; a 404 when no run of that name exists."""
    found = await summaries.pipelines(name=name, limit=1)
    if not found:
        raise NotFoundError(f"no run of a pipeline named {name!r}")
    return found[0]


async def stack_views(services: Services) -> list[StackView]:
    """Every stack, masked, the active one marked."""
    active = await services.stacks.active_name()
    return [public_stack(s, active) for s in await services.stacks.list_stacks()]


async def component_views(
    services: Services, components: list[ComponentSpec]
) -> list[ComponentView]:
    """``components`` masked, each with the stacks that use it."""
    stacks = await services.stacks.list_stacks()
    active = await services.stacks.active_name()
    return [public_component(c, stacks, active) for c in components]


async def stack_view(services: Services, name: str) -> StackView:
    active = await services.stacks.active_name()
    return public_stack(await services.stacks.get(name), active)


async def step_of(services: Services, run_id: str, name: str) -> StepRecord:
    """One step of a run, by name."""
    run = await services.runs.get_run(run_id)
    steps = await services.runs.steps_of(run.id)
    for step in steps:
        if step.name == name:
            return step
    raise NotFoundError(
        f"run {run.id} has no step {name!r} (its steps: {', '.join(s.name for s in steps)})"
    )


def elapsed(run: RunRecord, now: datetime | None = None) -> float | None:
    """Seconds the run took, or has taken so far while it is going."""
    if run.duration_s is not None:
        return run.duration_s
    if run.started is None:
        return None
    return ((now or utcnow()) - run.started).total_seconds()


class OutputLink(BaseModel):
    """An output of a step and the artifact that holds it."""

    name: str
    artifact_id: str | None
    size: int
    data_type: str


class StepView(BaseModel):
    """A step as the run page shows it; ``traceback`` is the failed attempt's, if kept."""

    name: str
    status: StepStatus
    attempt: int
    max_retries: int
    started: datetime | None
    finished: datetime | None
    duration_s: float | None
    worker: str | None
    error: str | None
    traceback: str | None
    retry_at: datetime | None
    cached_from: str | None
    has_logs: bool
    upstream: list[str]
    outputs: list[OutputLink]
    bar: Bar | None

    @property
    def retried(self) -> bool:
        return self.attempt > 1

    @property
    def cached(self) -> bool:
        return self.status is StepStatus.CACHED

    @property
    def done(self) -> bool:
        return self.status in FINISHED_STEP_STATUSES


class RunDetail(BaseModel):
    """A run and its steps as the run page shows them (and its live updates send)."""

    run: RunRecord
    finished: bool
    elapsed_s: float | None
    span_s: float
    steps: list[StepView]
    counts: dict[str, int]


async def run_detail(services: Services, run_id: str) -> RunDetail:
    """The run, masked, with each step's outputs linked to their artifacts."""
    run = await services.runs.get_run(run_id)
    steps = await services.runs.steps_of(run.id)
    artifacts = await services.artifacts.list_artifacts(run_id=run.id, limit=100_000)
    ids = {(a.step_name, a.output_name): a.id for a in artifacts}
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.status.value] = counts.get(step.status.value, 0) + 1
    end = run.finished or utcnow()
    axis = timeline(run.started, end, [(s.started, s.finished) for s in steps])
    return RunDetail(
        run=public_run(run),
        finished=run.status in FINISHED_RUN_STATUSES,
        elapsed_s=elapsed(run),
        span_s=axis.span_s,
        steps=[_step_view(s, ids, bar) for s, bar in zip(steps, axis.bars, strict=True)],
        counts=counts,
    )


def _step_view(step: StepRecord, ids: dict[tuple[str, str], str], bar: Bar | None) -> StepView:
    return StepView(
        name=step.name,
        status=step.status,
        attempt=step.attempt,
        max_retries=step.max_retries,
        started=step.started,
        finished=step.finished,
        duration_s=step.duration_s,
        worker=step.worker,
        error=step.error,
        traceback=step.traceback,
        retry_at=step.retry_at,
        cached_from=step.cached_from,
        has_logs=step.logs is not None,
        upstream=step.upstream,
        outputs=[
            OutputLink(
                name=name,
                artifact_id=ids.get((step.name, name)),
                size=ref.size,
                data_type=ref.data_type,
            )
            for name, ref in step.outputs.items()
        ],
        bar=bar,
    )


def edge_labels(spec: PipelineSpec) -> dict[tuple[str, str], str]:
    """The output names each step reads from each upstream step, by (upstream, step)."""
    labels: dict[tuple[str, str], list[str]] = {}
    for step in spec.steps:
        for binding in step.inputs.values():
            for selector in binding if isinstance(binding, list) else [binding]:
                names = labels.setdefault((selector.step, step.name), [])
                if selector.output not in names:
                    names.append(selector.output)
    return {edge: ", ".join(names) for edge, names in labels.items()}


def artifact_title(artifact: ArtifactRecord) -> str:
    return f"{artifact.step_name}.{artifact.output_name}"


def is_active(status: RunStatus) -> bool:
    return status not in FINISHED_RUN_STATUSES
