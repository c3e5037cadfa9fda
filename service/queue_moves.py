"""Changes that would move a service stack's queues (a rename, a delete, another broker,
virtual host or prefix), refused while its controller and workers still consume them: they
would go on consuming the old queues, and runs would wait in the new ones. Once such a change
is made, the old queues and exchanges go from the broker, those that are empty and unused.

Imported by every stack command: nothing here may import ``structlog`` or a broker client
at import time (tests/unit/test_cli_startup.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from conveyor.contracts import ConflictError, StackSpec
from conveyor.workers.loggers import get_logger
from conveyor.workers.queue_removal import remove_queues
from conveyor.workers.stack_probes import QueueReport, queue_report, queues_place

MAX_CHECKED_POOLS = 100
"""The most pools of a stack's runs whose step queues are asked about (the first by name),
besides those of its configuration: each is a round trip to the broker (two for a queue
that is not there) within the probe's 5 s (``PROBE_TIMEOUT_S``), about 1 ms each on the
broker's own machine."""


@dataclass(frozen=True)
class QueueCheck:
    """What asking a stack's broker before a change found: its queues are free, or
    (``unreached``) why the broker could not be asked, for a change made all the same."""

    unreached: str | None = None


def consumers_in(report: QueueReport) -> str | None:
    """How many consumers are on which queues of ``report`` (``None``: none at all)."""
    busy = [queue for queue in report.queues if queue.consumers]
    if not busy:
        return None
    return ", ".join(f"{queue.consumers} on {queue.name}" for queue in busy)


async def check_no_consumers(
    stack: StackSpec,
    done: str,
    then: str,
    *,
    pools: Iterable[str] = (),
    unchecked_ok: bool = False,
) -> QueueCheck:
    """Refuse (ConflictError) while anything consumes a rabbitmq ``stack``'s queues (with
    the step queues of ``pools``, those its runs used, besides its configuration's), and,
    unless ``unchecked_ok``, when the broker cannot tell: its controller and workers, started
    with ``--stack NAME``, would go on consuming them once the stack is ``done``. ``then``
    says what to do instead. Messages waiting in the queues do not count: unfinished runs
    are checked from the store. With ``unchecked_ok``, a broker that could not be asked is
    a check whose ``unreached`` says why."""
    report = await queue_report(stack, pools=pools)
    if report is None:
        return QueueCheck()
    if report.problem is not None:
        if unchecked_ok:
            return QueueCheck(unreached=report.problem)
        raise ConflictError(
            f"stack {stack.name!r} cannot be {done} now: whether its controller and workers "
            f"still consume its queues could not be checked ({report.problem}); "
            "try again once the broker answers"
        )
    consumers = consumers_in(report)
    if consumers is not None:
        raise ConflictError(
            f"stack {stack.name!r} has consumers on its queues ({consumers}): its controller "
            f"and workers (started with --stack {stack.name} or its stack file) would go on "
            f"consuming them once it is {done}; {then}"
        )
    return QueueCheck()


async def check_queues_kept(
    before: StackSpec, after: StackSpec, pools: Iterable[str] = ()
) -> QueueCheck | None:
    """Refuse to change ``before`` into ``after`` when that moves its queues (another broker,
    virtual host or prefix) while its controller and workers consume the old ones (those of
    ``pools`` too, the pools its runs used). Moving to
    an embedded orchestrator strands no run, and a broker that cannot be reached may be the
    one the change moves away from: both allowed. ``None`` when the queues stay where they
    are; else the check, for ``after_move`` once the change is made."""
    old, new = queues_place(before), queues_place(after)
    if old is None or old == new:
        return None
    if new is None:
        return QueueCheck()
    return await check_no_consumers(
        before,
        "moved to other queues",
        f"stop them, change it, then start them again with --stack {before.name}",
        pools=pools,
        unchecked_ok=True,
    )


async def after_move(
    stack: StackSpec, pools: Iterable[str], done: str, check: QueueCheck = QueueCheck()
) -> None:
    """Once ``stack`` is ``done`` (renamed, deleted, moved): remove its old queues, or, when
    its broker could not be asked before (``check``), say that they stay there unchecked
    (asking it again would make the user wait as long a second time)."""
    if check.unreached is None:
        await remove_old_queues(stack, pools, done)
        return
    get_logger("conveyor.stacks").warning(
        f"stack {done} without checking that nothing consumes its queues: its broker could "
        "not be asked; its old queues stay on the broker (delete them there once it answers)",
        stack=stack.name,
        problem=check.unreached,
    )


async def remove_old_queues(stack: StackSpec, pools: Iterable[str], done: str) -> None:
    """Remove from the broker the queues and exchanges of ``stack`` as it was before it was
    ``done`` (renamed, deleted, moved), those that are empty and unused (with the step
    queues of ``pools``). What stays, and why, is a warning: the change itself is made."""
    removal = await remove_queues(stack, pools)
    if removal is None:
        return
    log = get_logger("conveyor.stacks").bind(stack=stack.name, done=done)
    if removal.problem is not None:
        log.warning("old queues not removed; delete them on the broker", problem=removal.problem)
    elif removal.kept:
        log.warning("old queues kept: not empty or in use", kept=removal.kept)
    log.info("old queues removed", removed=removal.removed)
