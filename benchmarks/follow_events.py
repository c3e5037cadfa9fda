"""What following a large run through the server costs the server, and what recording a
step change costs the controller's store.

A run of ``N`` steps (10,000 by default) is recorded straight into a fresh store through
``RunStore.apply``, one transaction per step change (each step running, then completed with
an output): ``apply_ms_per_change``. Then 20 reads of the run's event stream while nothing
changes (``quiet_poll_ms``) and 20 after one step changed each time (``changed_poll_ms``).
Before it is recorded, the run is a request (queued, as while a service stack's controller
is down): 20 reads of its stream then are ``queued_poll_ms``.
Before ``RunWatch`` existed (387d24f and older), the script times what the stream did then:
the run and every step read again.

    python benchmarks/follow_events.py [N]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

from conveyor.contracts import (
    ArtifactRef,
    PipelineSpec,
    RunStatus,
    StepSpec,
    StepStatus,
    new_id,
    utcnow,
)
from conveyor.service.context import Services
from conveyor.service.run_state import StepUpdate, Transition
from conveyor.service.store.db import Writes

READS = 20


async def _record(services: Services, run_id: str, update: StepUpdate, first: bool) -> None:
    writes = Writes()
    change = Transition([update], RunStatus.RUNNING if first else None)
    services.runs.apply(writes, run_id, change, utcnow())
    await services.db.write(writes)


async def _queued_poll_s(services: Services, run_id: str) -> float:
    """Seconds a read of the stream of the queued run ``run_id`` takes."""
    from conveyor.service.api.run_events import RunWatch

    watch = RunWatch(services, run_id, 0.5)
    await watch.poll()
    wall = time.perf_counter()
    for _ in range(READS):
        await watch.poll()
    return (time.perf_counter() - wall) / READS


async def main(size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as home:
        services = await Services.open(home)
        stack = await services.stacks.get("default")
        run_id = new_id()
        steps = [StepSpec(name=f"s{i}", ref="m:f") for i in range(size)]
        spec = PipelineSpec(name="fan", steps=steps)
        await services.run_requests.record(run_id, spec, stack, None, utcnow())
        queued = await _queued_poll_s(services, run_id)
        writes = Writes()
        services.runs.insert_run(
            writes,
            run_id=run_id,
            spec=spec,
            stack_id=stack.id,
            stack_name=stack.name,
            stack_snapshot={},
            idempotency_key=None,
            owner=None,
            now=utcnow(),
        )
        services.run_requests.mark_taken(writes, run_id)
        await services.db.write(writes)
        output = ArtifactRef(
            uri="file:///x/ab/cd",
            digest="blake3:" + "a" * 64,
            size=1,
            materializer="json",
            data_type="builtins.int",
        )
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(size):
            await _record(services, run_id, StepUpdate(f"s{i}", StepStatus.RUNNING, 1), i == 0)
        for i in range(size):
            done = StepUpdate(f"s{i}", StepStatus.COMPLETED, 1, outputs={"out": output})
            await _record(services, run_id, done, False)
        apply_cpu, apply_wall = time.process_time() - cpu, time.perf_counter() - wall

        try:
            from conveyor.service.api.run_events import RunWatch

            watch = RunWatch(services, run_id, 0.5)
            read = watch.poll
        except ImportError:  # before RunWatch: the stream read the run and every step

            async def read() -> None:
                await services.runs.get_run(run_id)
                await services.runs.steps_of(run_id)

        await read()  # the first read takes every step, as before
        wall = time.perf_counter()
        for _ in range(READS):
            await read()
        quiet = (time.perf_counter() - wall) / READS
        spent = 0.0
        for i in range(READS):
            await _record(services, run_id, StepUpdate(f"s{i}", StepStatus.COMPLETED, 2), False)
            wall = time.perf_counter()
            await read()
            spent += time.perf_counter() - wall
        await services.close()
    return {
        "apply_ms_per_change": 1000 * apply_wall / (2 * size),
        "apply_cpu_ms_per_change": 1000 * apply_cpu / (2 * size),
        "quiet_poll_ms": 1000 * quiet,
        "changed_poll_ms": 1000 * spent / READS,
        "queued_poll_ms": 1000 * queued,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))))
