"""Who consumes a service stack's queues, and what to start when nobody does.

On a rabbitmq stack a run needs a controller (it consumes the stack's runs queue) and, for
each pool the run's steps name, a worker consuming that pool's step queue. Either may be
missing, and the run then waits without a word; the broker's consumer counts tell which.
The same counts refuse a change that would move its queues (``queue_moves``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from conveyor.contracts import DEFAULT_POOL, StackSpec, Topology
from conveyor.workers.loggers import get_logger
from conveyor.workers.stack_probes import queue_report

log = get_logger("conveyor.consumers")

FIRST_LOOK_S = 1.0
"""How long a run may wait before its missing consumers are told."""
LOOK_EVERY_S = 2.0


@dataclass(frozen=True)
class Missing:
    """A queue a run needs that nobody consumes, and the command that starts a consumer."""

    what: str
    queue: str
    command: str

    def __str__(self) -> str:
        return f"no {self.what} consumes {self.queue}; start one with: {self.command}"


def missing_consumers(
    stack: str, topology: Topology, pools: Iterable[str], counts: Mapping[str, int]
) -> list[Missing]:
    """What a run of ``stack`` whose steps use ``pools`` waits for, given consumer counts."""
    found = []
    if counts.get(topology.runs_queue, 0) == 0:
        found.append(
            Missing("controller", topology.runs_queue, f"conveyor controller start --stack {stack}")
        )
    for pool in sorted(set(pools)):
        queue = topology.step_queue(pool)
        if counts.get(queue, 0) == 0:
            option = "" if pool == DEFAULT_POOL else f" --pool {pool}"
            found.append(
                Missing(
                    f"worker of pool {pool!r}",
                    queue,
                    f"conveyor worker start --stack {stack}{option}",
                )
            )
    return found


async def watch_consumers(
    stack: StackSpec,
    topology: Topology,
    pools: Iterable[str],
    say: Callable[[str], None],
    *,
    first_look: float = FIRST_LOOK_S,
    every: float = LOOK_EVERY_S,
) -> None:
    """Tell through ``say`` which consumers a run waits for, and when one comes; until
    cancelled. A broker that does not answer is the broker's own warning, not this one's."""
    pools = sorted(set(pools))
    told: list[Missing] = []
    await asyncio.sleep(first_look)
    while True:
        report = await queue_report(stack, every, pools)
        if report is not None and report.problem is None:
            counts = {queue.name: queue.consumers or 0 for queue in report.queues}
            now = missing_consumers(stack.name, topology, pools, counts)
            for gone in now:
                if gone not in told:
                    say(f"Waiting: {gone}")
            for back in told:
                if back not in now:
                    say(f"A {back.what} consumes {back.queue} now")
            told = now
        elif report is not None:
            log.debug("consumers not counted", problem=report.problem)
        await asyncio.sleep(every)
