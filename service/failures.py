"""What a caller who waited for a run is told when it did not complete: a ``RunFailed``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from conveyor.contracts import RunFailed, RunRecord, RunStatus, StepRecord, StepStatus


def failure_of(record: RunRecord, steps: Sequence[StepRecord], run: Any) -> RunFailed | None:
    """The error for a finished run that did not complete (``None`` if it completed).

    It names the first failed step in pipeline order, with its error and the traceback of
    the user's code, so that an uncaught ``RunFailed`` reads like the step's own failure.
    """
    if record.status is RunStatus.COMPLETED:
        return None
    failed = [s for s in steps if s.status is StepStatus.FAILED]
    verb = "was cancelled" if record.status is RunStatus.CANCELLED else "failed"
    message = f"run {record.id} of pipeline {record.pipeline!r} {verb}"
    if not failed:
        return RunFailed(
            f"{message}: {record.error}" if record.error else message,
            run_id=record.id,
            status=record.status,
            run=run,
        )
    first = failed[0]
    message += f": step {first.name!r} failed: {first.error}"
    if len(failed) > 1:
        message += f" (also failed: {', '.join(s.name for s in failed[1:])})"
    if first.traceback:
        where = f" on {first.worker}" if first.worker else ""
        message += f"\n\nStep {first.name!r} raised{where}:\n{first.traceback.rstrip()}"
    return RunFailed(
        message,
        run_id=record.id,
        status=record.status,
        run=run,
        step=first.name,
        step_error=first.error,
        step_traceback=first.traceback,
    )
