"""``conveyor pipeline run``, ``conveyor run ...`` and ``conveyor artifact ...``"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from conveyor.contracts import RunStatus, StepStatus
from conveyor.service.cli.output import (
    OUTPUT_OPTION,
    YES_OPTION,
    OutputFormat,
    confirm,
    console,
    emit,
    errors,
    escape,
    fail,
    say,
    seconds,
    status,
    table,
    user_errors,
    when,
)
from conveyor.service.cli.state import client
from conveyor.service.home import HOME_ENV, Home
from conveyor.service.login import read_login

# The records, the store's rules, the flavors and rich's progress are imported in the commands
# that use them: building these commands (for `conveyor --help` too) needs none of them.
if TYPE_CHECKING:
    from conveyor.contracts import ArtifactRecord, PipelineSpec, RunRecord, StepRecord
    from conveyor.service.engine import AsyncRun, Conveyor
    from conveyor.service.pipelines import PipelineDefinition
    from conveyor.workers.steps import StepDefinition

pipeline_app = typer.Typer(help="Run pipelines.")
run_app = typer.Typer(help="Inspect pipeline runs.")
artifact_app = typer.Typer(help="Inspect and fetch step outputs.")

PREVIEW_BYTES = 4096


def _snapshot_rows(run: RunRecord) -> list[list[str]]:
    from conveyor.workers.flavors import masked_stack_snapshot

    components = masked_stack_snapshot(run.stack_snapshot).get("components", {})
    return [
        [kind.upper(), c.get("name", ""), c.get("flavor", ""), c.get("id", "")]
        for kind, c in sorted(components.items())
    ]


def _parse_params(pairs: list[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"--param takes name=value, got {pair!r}")
        params[key] = raw
    return params


def _checked_params(definition: PipelineDefinition, pairs: list[str]) -> dict[str, Any]:
    """``-p`` values checked against the pipeline's signature before anything starts; a
    parameter that does not fit is a usage error (exit 2)."""
    from conveyor.service.pipeline_parameters import ParameterError

    params = definition.parameters.from_text(_parse_params(pairs))
    try:
        definition.parameters.bind((), params)
    except ParameterError as exc:
        errors().print(f"[red]Error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    return params


async def _leaf_outputs(run: AsyncRun, steps: list[StepRecord]) -> dict[str, Any]:
    used = {up for s in steps for up in s.upstream}
    shown: dict[str, Any] = {}
    for record in steps:
        if record.name in used or record.status not in (StepStatus.COMPLETED, StepStatus.CACHED):
            continue
        for output, ref in record.outputs.items():
            if ref.size <= PREVIEW_BYTES and ref.materializer in ("json", "str"):
                shown[f"{record.name}.{output}"] = await run.load(record.name, output)
    return shown


def _run_pipeline(
    definition: PipelineDefinition,
    stack: str | None,
    params: dict[str, Any],
    *,
    cache: bool = True,
    retry_of: str | None = None,
) -> tuple[RunRecord, list[StepRecord], dict[str, Any]]:
    # Imported and compiled before the loop runs: both take a while and would stall it.
    # The engine is imported by the one command that runs it: the others start faster.
    import asyncio

    from conveyor.service.engine import Conveyor

    spec, definitions = definition.compile(**params)
    conveyor = Conveyor(stack=stack)
    return asyncio.run(_follow(conveyor, definition, spec, definitions, cache, retry_of))


async def _follow(
    conveyor: Conveyor,
    definition: PipelineDefinition,
    spec: PipelineSpec,
    definitions: dict[str, StepDefinition],
    cache: bool,
    retry_of: str | None,
) -> tuple[RunRecord, list[StepRecord], dict[str, Any]]:
    import asyncio

    from conveyor.service.cli.run_progress import RunFollower, announce_run

    async with conveyor as cv:
        assert cv.stack is not None
        # What the run is doing goes to stderr; its outputs and outcome to stdout.
        async with RunFollower(status(), definition.name, len(spec.steps)) as follower:
            run = await cv.submit_compiled(
                spec, definitions, on_step=follower.on_step, cache=cache, retry_of=retry_of
            )
            announce_run(status(), definition.name, cv.stack.name, run.id, retry_of)
            try:
                record = await run.wait(on_waiting=say)
            except asyncio.CancelledError:
                errors().print(f"Interrupted: cancelling run {run.id}")
                await run.interrupt("interrupted (Ctrl+C on conveyor pipeline run)", say)
                raise
        steps = await run.steps()
        return record, steps, await _leaf_outputs(run, steps)


@pipeline_app.command("run")
def run_pipeline(
    target: str = typer.Argument(
        ..., metavar="TARGET", help="FILE.py:PIPELINE or package.module:PIPELINE"
    ),
    stack: str = typer.Option(None, "--stack", "-s", help="Stack to run on (default: active)"),
    param: list[str] = typer.Option(
        [], "--param", "-p", metavar="NAME=VALUE", help="A pipeline parameter (repeatable)"
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Run every step; reuse no earlier run's outputs"
    ),
) -> None:
    """Run a pipeline, following it step by step; exit 1 if it fails.

    A step whose code, parameters and inputs are those of an earlier run's step is not run
    again: it is 'cached', its outputs reused (see docs/caching.md).

    Example: conveyor pipeline run examples/quickstart.py:training_pipeline -p epochs=100
    """
    # As `python -m` does: a module of the working directory is importable by its name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from conveyor.service.pipelines import load_pipeline

    with user_errors():
        logged_in = read_login(Home.resolve()) is not None
        definition = load_pipeline(target)
        params = _checked_params(definition, param)
        record, steps, outputs = _interruptible(
            definition, stack, params, cache=not no_cache, remote=logged_in
        )
    _report(record, steps, outputs)


def _interruptible(
    definition: PipelineDefinition,
    stack: str | None,
    params: dict[str, Any],
    *,
    cache: bool = True,
    retry_of: str | None = None,
    remote: bool = False,
) -> tuple[RunRecord, list[StepRecord], dict[str, Any]]:
    try:
        if remote:
            from conveyor.service.cli.remote_runs import run_on_server

            return run_on_server(definition, stack, params, cache=cache, retry_of=retry_of)
        return _run_pipeline(definition, stack, params, cache=cache, retry_of=retry_of)
    except KeyboardInterrupt:
        # The run is cancelled and recorded. A sync step's thread cannot be stopped and
        # would hold the interpreter's exit until the step's end: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _report(record: RunRecord, steps: list[StepRecord], outputs: dict[str, Any]) -> None:
    """A followed run's outputs and outcome on stdout, its failures on stderr; exit 1 if it
    did not complete."""
    for name, value in outputs.items():
        console().print(f"{name} = {json.dumps(value)}", markup=False, soft_wrap=True)
    style = "green" if record.status is RunStatus.COMPLETED else "red"
    console().print(
        f"Run {record.id} [{style}]{record.status.value}[/{style}] in {seconds(record.duration_s)}",
        soft_wrap=True,
    )
    if record.status is not RunStatus.COMPLETED:
        for step in steps:
            if step.status is StepStatus.FAILED:
                # An error is the user's text: "[/x]" in it is not markup.
                errors().print(
                    f"[red]Step '{escape(step.name)}' failed:[/red] {escape(step.error or '')}"
                )
                if step.traceback:
                    errors().print(step.traceback, markup=False)
        if record.error:
            errors().print(f"[red]Run failed:[/red] {escape(record.error)}")
        raise typer.Exit(1)


@run_app.command("retry")
def retry_run(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)"),
) -> None:
    """Run a failed or cancelled run again, reusing the steps that completed there.

    The same pipeline and parameters, on the same stack, compiled from the code as it is
    now; each step that completed with unchanged code, parameters and inputs is reused
    (cached), the others run, and the command follows the new run.

    Example: conveyor run retry 3f2a
    """
    from conveyor.service.run_retries import pipeline_to_retry

    with user_errors():
        c = client(ctx)
        old = c.get_run(run_id)
        spec = c.get_spec(old.id)
        remote = read_login(Home.resolve()) is not None
        _enter_submitted_folder(old, spec)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        definition, params = pipeline_to_retry(old, spec)
        record, steps, outputs = _interruptible(
            definition, old.stack_name, params, retry_of=old.id, remote=remote
        )
    _report(record, steps, outputs)


def _enter_submitted_folder(run: RunRecord, spec: PipelineSpec) -> None:
    """Work in the folder ``run`` was submitted from, when it recorded one that is still
    there: its pipeline reference (a file path, a module) is found from there, and its
    steps see the same working directory as then."""
    from conveyor.service.run_retries import submitted_from

    folder = submitted_from(spec)
    if folder is None or folder == Path.cwd():
        return
    # This process's home stays the one it is now, wherever CONVEYOR_HOME pointed from.
    os.environ[HOME_ENV] = str(Home.resolve().path)
    os.chdir(folder)
    status().print(f"Retrying run {run.id} from {folder}, the folder it was submitted from")


@run_app.command("list")
def list_runs(
    ctx: typer.Context,
    stack: str = typer.Option(None, "--stack", "-s", help="Only runs on this stack"),
    pipeline: str = typer.Option(None, "--pipeline", help="Only runs of this pipeline"),
    status: RunStatus = typer.Option(None, "--status", help="Only runs with this status"),
    user: str = typer.Option(None, "--user", help="Only runs this user submitted"),
    limit: int = typer.Option(50, "--limit", help="At most this many, newest first"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """List runs, newest first, with who submitted each.

    Example: conveyor run list --stack default --status failed --user alice
    """
    from conveyor.service.public_records import public_run

    with user_errors():
        runs = client(ctx).list_runs(
            stack=stack, pipeline=pipeline, status=status, user=user, limit=limit
        )
    emit(
        output,
        [public_run(r) for r in runs],
        lambda _: table(
            ["RUN ID", "PIPELINE", "STACK", "STATUS", "STARTED", "DURATION", "USER"],
            [
                [
                    r.id,
                    r.pipeline,
                    r.stack_name,
                    r.status.value,
                    when(r.started or r.created),
                    seconds(r.duration_s),
                    r.user,
                ]
                for r in runs
            ],
        ),
    )


@run_app.command("describe")
def describe_run(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Show a run and each of its steps: status, attempts, duration, error, outputs.

    Example: conveyor run describe 3f2a
    """
    from conveyor.service.public_records import public_run

    with user_errors():
        c = client(ctx)
        run = c.get_run(run_id)
        steps = c.get_steps(run.id)

    emit(output, {"run": public_run(run), "steps": steps}, lambda _: _described(run, steps))


def _described(run: RunRecord, steps: list[StepRecord]) -> list[object]:
    """``run describe`` as tables of short cells, and the long texts (URIs, errors,
    tracebacks) on lines of their own, so that a narrow terminal cuts none of them."""
    from rich.text import Text

    if run.duration_s is not None:
        took = f" in {seconds(run.duration_s)}"
    else:  # queued, or ended before it started (its stack stopped, its process died)
        took = ", never started" if run.finished is not None else ""
    components = _snapshot_rows(run)  # none for a run that never started
    stack = table(
        ["COMPONENT_TYPE", "COMPONENT_NAME", "FLAVOR", "COMPONENT ID"],
        components,
        caption="the stack as it was when the run started",
    )
    parts: list[object] = [
        f"Run [bold]{run.id}[/bold] of pipeline [bold]{escape(run.pipeline)}[/bold] on stack "
        f"'{escape(run.stack_name)}' (id {run.stack_id}), submitted by "
        f"{escape(run.user)}: {run.status.value}{took}",
        *([f"Retry of run {run.retry_of}"] if run.retry_of else []),
        *[f"Retried by run {other}" for other in run.retried_by],
        *([stack] if components else []),
        table(
            ["STEP", "STATUS", "ATTEMPTS", "DURATION", "WORKER"],
            [[s.name, s.status.value, s.attempt, seconds(s.duration_s), s.worker] for s in steps],
        ),
    ]
    parts.extend(_cached_lines(steps))
    outputs = [f"  {s.name}.{name}: {ref.uri}" for s in steps for name, ref in s.outputs.items()]
    if outputs:
        parts.append(Text("\n".join(["", "Outputs", *outputs])))
    for step in steps:
        if step.error:
            ended = step.status.value
            parts.append(f"\n[red]Step '{escape(step.name)}' {ended}:[/red] {escape(step.error)}")
        if step.retry_at is not None:
            due = f"{step.retry_at:%Y-%m-%d %H:%M:%S} UTC"
            parts.append(f"Step '{escape(step.name)}' retries: attempt {step.attempt} at {due}")
        if step.traceback:
            parts.append(Text(step.traceback.rstrip("\n")))
    if run.error:
        parts.append(f"[red]Run {run.status.value}:[/red] {escape(run.error)}")
    return parts


SHOWN_CACHED = 20
"""Cached steps named per source run in ``run describe``; more are counted."""


def _cached_lines(steps: list[StepRecord]) -> list[object]:
    """Which run each cached step's outputs came from: one line per source run."""
    from rich.text import Text

    sources: dict[str, list[str]] = {}
    for step in steps:
        if step.status is StepStatus.CACHED and step.cached_from:
            sources.setdefault(step.cached_from, []).append(step.name)
    lines: list[object] = []
    for source, names in sources.items():
        shown = ", ".join(names[:SHOWN_CACHED])
        more = f" and {len(names) - SHOWN_CACHED} more" if len(names) > SHOWN_CACHED else ""
        lines.append(Text(f"Cached from run {source}: {shown}{more}"))
    return lines


@run_app.command("logs")
def run_logs(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)"),
    step: str = typer.Option(None, "--step", "-s", help="Only this step"),
) -> None:
    """Print what each step printed and logged (its last attempt), step by step.

    Example: conveyor run logs 3f2a --step train
    """
    with user_errors():
        c = client(ctx)
        run = c.get_run(run_id)
        logs = c.get_logs(run.id, step)
        steps = [s for s in c.get_steps(run.id) if step is None or s.name == step]
    shown = [s for s in steps if s.name in logs or s.traceback]
    if not shown:
        errors().print("No step printed or logged anything.")
    for record in shown:
        console().print(f"[bold]── {escape(record.name)} ──[/bold]")
        # Lines as the step wrote them: a terminal folds long ones, rich does not break them.
        if record.name in logs:
            console().print(logs[record.name].rstrip("\n"), markup=False, soft_wrap=True)
        if record.traceback:
            console().print(
                f"[red]Step '{escape(record.name)}' {record.status.value} (attempt "
                f"{record.attempt}):[/red]"
            )
            console().print(record.traceback.rstrip("\n"), markup=False, soft_wrap=True)


@run_app.command("cancel")
def cancel_run(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)"),
    reason: str = typer.Option("cancelled by user", "--reason", help="Recorded on the run"),
) -> None:
    """Cancel a pending or running run: unfinished steps are cancelled, late results ignored.

    Example: conveyor run cancel 3f2a --reason "wrong data set"
    """
    with user_errors():
        run = client(ctx).cancel_run(run_id, reason)
    status().print(f"Run {run.id} is {run.status.value}")


@run_app.command("delete")
def delete_run(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)"),
    yes: bool = YES_OPTION,
) -> None:
    """Delete a finished run's records (its artifacts stay in the store).

    Example: conveyor run delete 3f2a -y
    """
    from conveyor.service.store.runs import check_deletable

    with user_errors():
        c = client(ctx)
        run = c.get_run(run_id)
        check_deletable(run)
        confirm(f"Delete run {run.id}?", yes)
        c.delete_run(run.id)
    status().print(f"Deleted run {run.id}")


@artifact_app.command("list")
def list_artifacts(
    ctx: typer.Context,
    run: str = typer.Option(None, "--run", help="Only outputs of this run"),
    limit: int = typer.Option(100, "--limit", help="At most this many, newest first"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """List step outputs.

    Example: conveyor artifact list --run 3f2a
    """
    with user_errors():
        artifacts = client(ctx).list_artifacts(run_id=run, limit=limit)
    emit(
        output,
        artifacts,
        lambda data: table(
            ["ARTIFACT ID", "RUN ID", "STEP", "OUTPUT", "TYPE", "SIZE", "URI"],
            [
                [a.id, a.run_id, a.step_name, a.output_name, a.ref.data_type, a.ref.size, a.ref.uri]
                for a in data
            ],
        ),
    )


@artifact_app.command("describe")
def describe_artifact(
    ctx: typer.Context,
    artifact_id: str = typer.Argument(..., help="Artifact id (a unique prefix is enough)"),
    output: OutputFormat = OUTPUT_OPTION,
) -> None:
    """Show an artifact's metadata.

    Example: conveyor artifact describe 9bd1
    """
    with user_errors():
        artifact = client(ctx).get_artifact(artifact_id)
    emit(output, artifact, _artifact_table)


def _artifact_table(a: ArtifactRecord) -> object:
    return table(
        ["KEY", "VALUE"],
        [
            ["id", a.id],
            ["run", a.run_id],
            ["step", a.step_name],
            ["output", a.output_name],
            ["type", a.ref.data_type],
            ["materializer", a.ref.materializer],
            ["materializer version", a.ref.materializer_version or "-"],
            ["size", a.ref.size],
            ["digest", a.ref.digest],
            ["uri", a.ref.uri],
            ["created", when(a.created)],
        ],
    )


@artifact_app.command("get")
def get_artifact(
    ctx: typer.Context,
    artifact_id: str = typer.Argument(..., help="Artifact id (a unique prefix is enough)"),
    to: Path = typer.Option(None, "--to", help="Write the stored bytes to this file"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load a pickled value"),
    trust: list[str] = typer.Option(
        [],
        "--trust",
        metavar="TYPE",
        help="A type a stored estimator may build beyond those skops trusts (repeatable)",
    ),
) -> None:
    """Print an artifact's value, or save its bytes with --to.

    Example: conveyor artifact get 9bd1 --to model.npy
    """
    with user_errors():
        c = client(ctx)
        if to is not None:
            artifact = c.get_artifact(artifact_id)
            size = c.save_artifact_file(artifact.id, to)
            status().print(f"Wrote {size} bytes to {to}")
            return
        value = c.load_artifact(artifact_id, allow_pickle=allow_pickle, trust=trust)
    console().print(repr(value) if not isinstance(value, str) else value, markup=False)
