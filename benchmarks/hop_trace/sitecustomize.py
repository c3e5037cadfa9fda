"""Timestamps per hop of a step, for ``benchmarks/hops.py``: imported at start by every
Python process that has this folder on its path, and inert unless ``CONVEYOR_HOP_TRACE``
names a file prefix. It wraps a few of Conveyor's internal functions (their names may
change: a wrapper that no longer finds its function writes a ``patch-failed`` line).

Each line: wall-clock time, pid, what happened, and the events it concerned.
"""

from __future__ import annotations

import os
import time
from typing import Any

_prefix = os.environ.get("CONVEYOR_HOP_TRACE")


def _install(prefix: str) -> None:
    out = open(f"{prefix}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115 (for the process)
    pid = os.getpid()

    def note(tag: str, detail: str = "") -> None:
        out.write(f"{time.time():.6f} {pid} {tag} {detail}\n")

    def names(events: Any) -> str:
        found = []
        for event in events:
            step = getattr(event, "step", "")
            found.append(f"{event.type}:{getattr(step, 'name', step)}")
        return ",".join(found)

    try:
        from conveyor.service import controller
        from conveyor.service.store import Database
        from conveyor.workers import broker_rabbitmq, execution, rabbitmq_consumers

        parse = rabbitmq_consumers.parse_event

        def parse_event(body: bytes) -> Any:
            began = time.time()
            event = parse(body)
            note("received", f"{names([event])} {began:.6f}")
            return event

        rabbitmq_consumers.parse_event = parse_event

        publish = broker_rabbitmq.RabbitMQBroker.publish

        async def publish_traced(self: Any, events: Any) -> None:
            what = names(events)
            note("publish", what)
            await publish(self, events)
            note("confirmed", what)

        broker_rabbitmq.RabbitMQBroker.publish = publish_traced  # type: ignore[method-assign]

        execute = execution.StepExecutor.execute

        async def execute_traced(self: Any, ready: Any, **kwargs: Any) -> Any:
            note("execute", ready.step.name)
            outcome = await execute(self, ready, **kwargs)
            note("executed", ready.step.name)
            return outcome

        execution.StepExecutor.execute = execute_traced  # type: ignore[method-assign]

        write = Database.write

        async def write_traced(self: Any, writes: Any) -> None:
            note("commit")
            await write(self, writes)
            note("committed")

        Database.write = write_traced  # type: ignore[method-assign]

        process = controller.Controller._process

        async def process_traced(self: Any, deliveries: Any) -> None:
            note("batch", names([d.event for d in deliveries]))
            await process(self, deliveries)

        controller.Controller._process = process_traced  # type: ignore[method-assign]
    except Exception as exc:  # a benchmark aid: it says so, and the process goes on
        note("patch-failed", repr(exc))


if _prefix:
    _install(_prefix)
