"""Runs recorded straight into a store, as a controller would record them: for tests of
what reads the store (the CLI, the API's event stream) without running anything."""

from __future__ import annotations

from conveyor.contracts import PipelineSpec, StepSpec, new_id, utcnow
from conveyor.service.context import Services
from conveyor.service.store.db import Writes


async def record_run(services: Services, steps: int, run_id: str | None = None) -> str:
    """A pending run of ``steps`` steps (``s0``, ``s1``, ...) on the default stack; its id."""
    run_id = run_id or new_id()
    stack = await services.stacks.get("default")
    writes = Writes()
    services.runs.insert_run(
        writes,
        run_id=run_id,
        spec=PipelineSpec(
            name="fan", steps=[StepSpec(name=f"s{i}", ref="m:f") for i in range(steps)]
        ),
        stack_id=stack.id,
        stack_name=stack.name,
        stack_snapshot={},
        idempotency_key=None,
        owner=None,
        now=utcnow(),
    )
    services.run_requests.mark_taken(writes, run_id)
    await services.db.write(writes)
    return run_id
