"""Idempotency keys: the same key and the same request is the same run; a key reused for
another request is refused (``ConflictError``, an HTTP 409), never answered with the old run."""

from __future__ import annotations

import json

from conveyor.contracts import ConflictError, PipelineSpec, RunRecord


def check_reused_key(key: str, existing: RunRecord, spec: PipelineSpec, stack_id: str) -> None:
    """Refuse ``key``, which made ``existing``, for a run of ``spec`` on another pipeline,
    other parameters or another stack than that run's."""
    # Compare as stored: the store keeps parameters as JSON (a tuple comes back a list).
    asked = (spec.name, json.loads(json.dumps(spec.parameters)), stack_id)
    if (existing.pipeline, existing.parameters, existing.stack_id) != asked:
        raise ConflictError(
            f"idempotency key {key!r} was used for run {existing.id} (pipeline "
            f"{existing.pipeline!r} on stack {existing.stack_name!r} with parameters "
            f"{existing.parameters}); use a new key for a different run"
        )
