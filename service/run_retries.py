"""Retrying a run: which runs may be retried, and the pipeline and parameters to run again.

A retry is a new run of the same pipeline reference and parameters, compiled again from the
code as it is now (a fixed bug is picked up), that names the run it retries. Its controller
completes from the old run's outputs every step that completed or was cached there and
whose cache key is unchanged (the same code, parameters and inputs), and runs the others.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.contracts import ConflictError, ConveyorError, PipelineSpec, RunRecord, RunStatus
from conveyor.service.pipelines import PipelineDefinition, load_pipeline

if TYPE_CHECKING:
    from conveyor.service.handles import RunHandle

RETRYABLE = frozenset({RunStatus.FAILED, RunStatus.CANCELLED})


def check_retryable(run: RunRecord) -> None:
    """Only a run that failed or was cancelled may be retried."""
    if run.status is RunStatus.COMPLETED:
        raise ConflictError(
            f"run {run.id} completed, there is nothing to retry; only a failed or cancelled "
            "run can be retried"
        )
    if run.status not in RETRYABLE:
        raise ConflictError(
            f"run {run.id} is {run.status.value}: cancel it first, or wait for its end; only "
            "a failed or cancelled run can be retried"
        )


def submitted_from(spec: PipelineSpec) -> Path | None:
    """The folder a run's pipeline was compiled in, when the run recorded it and it is
    still there: its reference is found from there, as when it was submitted."""
    if spec.folder is None:
        return None
    folder = Path(spec.folder)
    return folder if folder.is_dir() else None


def pipeline_to_retry(
    run: RunRecord, spec: PipelineSpec
) -> tuple[PipelineDefinition, dict[str, Any]]:
    """The pipeline that ``run`` ran, loaded again from its reference (in the working
    directory), and its parameters."""
    check_retryable(run)
    if not spec.ref:
        raise ConveyorError(f"run {run.id} names no pipeline reference to compile again")
    try:
        definition = load_pipeline(spec.ref)
    except ConveyorError as exc:
        raise ConveyorError(f"cannot retry run {run.id}: {exc} ({_where(spec)})") from None
    return definition, dict(run.parameters)


def _where(spec: PipelineSpec) -> str:
    """Where the reference was looked for, and where it was submitted from."""
    here = os.getcwd()
    if spec.folder is None or spec.folder == here:
        return f"looked for from {here}; run the retry from the folder its pipeline ran from"
    if submitted_from(spec) is None:
        return f"looked for from {here}; the run was submitted from {spec.folder}, which is gone"
    return f"looked for from {here}; the run was submitted from {spec.folder}: retry it there"


def retry(run: RunRecord, spec: PipelineSpec, *, raise_on_failure: bool) -> RunHandle:
    """Run ``run`` (recorded with ``spec``) again on its stack and wait for the end; the
    new run names it in ``retry_of``. ``Client.retry_run``, local or through a server."""
    from conveyor.service.handles import run_pipeline  # the engine: imported to run only

    definition, parameters = pipeline_to_retry(run, spec)
    return run_pipeline(
        definition,
        (),
        parameters,
        raise_on_failure=raise_on_failure,
        stack=run.stack_name,
        retry_of=run.id,
    )
