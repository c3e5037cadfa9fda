"""A seeded schedule of faults, and the nemesis that inflicts it on a :class:`FaultStack`.

Fault kinds (choose with ``parse_kinds("kill-worker,cut-broker")``):

- ``kill-worker``: SIGKILL a worker, then start a new one in its place.
- ``kill-controller``: SIGKILL the controller, then start a new one.
- ``freeze-worker``: SIGSTOP a worker for a few seconds, then SIGCONT.
- ``freeze-controller``: the same to the controller.
- ``cut-broker``: abort every broker connection at once (the TCP proxy's ``cut``).
- ``freeze-broker``: blackhole every broker connection for a few seconds, then resume.
- ``down-broker``: the broker goes away for a few seconds: every connection is cut and new
  ones are reset at once, until it is back.

Faults come one after the other, never overlapping: each is applied, lifted, and logged
with its wall-clock times before the next one starts.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from tests.faults.checker import FaultWindow
from tests.faults.harness import FaultStack

log = structlog.get_logger("conveyor.nemesis")

KINDS = (
    "kill-worker",
    "kill-controller",
    "freeze-worker",
    "freeze-controller",
    "cut-broker",
    "freeze-broker",
    "down-broker",
)
HELD = frozenset({"freeze-worker", "freeze-controller", "freeze-broker", "down-broker"})
HOLD_S = (1.5, 5.0)
"""How long a freeze or a broker outage lasts: around the harness's lease (2.5 s), so that a
frozen worker sometimes keeps its steps and sometimes loses them to another."""
CALM_S = 1.0
"""The least time between a fault lifted (a replacement process started) and the next one:
a fault that overran its slot must not let the next one kill a controller that has not
done anything yet."""


@dataclass(frozen=True)
class PlannedFault:
    at_s: float  # after the campaign's start
    kind: str
    target: int  # which worker, for worker faults
    hold_s: float  # how long a freeze or an outage lasts


def parse_kinds(text: str) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of fault kinds, checked."""
    if text.strip() == "all":
        return KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown or [text]}: choose from {', '.join(KINDS)}")
    return kinds


def plan(
    seed: int,
    kinds: Sequence[str],
    count: int,
    span_s: float,
    workers: int,
    start_s: float = 2.0,
    hold_s: tuple[float, float] = HOLD_S,
) -> list[PlannedFault]:
    """``count`` faults spread over ``span_s`` seconds after ``start_s``, in a seeded order.

    Every kind comes ``count // len(kinds)`` or one more times, so a short campaign still
    tries each; the order, the targets, the jitter and the hold times are random.
    """
    rng = random.Random(seed)
    order = [kinds[i % len(kinds)] for i in range(count)]
    rng.shuffle(order)
    gap = span_s / max(count, 1)
    faults = []
    for index, kind in enumerate(order):
        faults.append(
            PlannedFault(
                at_s=round(start_s + index * gap + rng.uniform(0, gap / 2), 2),
                kind=kind,
                target=rng.randrange(workers),
                hold_s=round(rng.uniform(*hold_s), 2) if kind in HELD else 0.0,
            )
        )
    return faults


async def inflict(fault: PlannedFault, stack: FaultStack) -> float:
    """Apply one fault and lift it; when it was lifted (time.time())."""
    if fault.kind == "kill-worker":
        lifted = await stack.kill_worker(fault.target)
    elif fault.kind == "kill-controller":
        lifted = await stack.kill_controller()
    elif fault.kind == "freeze-worker":
        lifted = await stack.freeze_worker(fault.target, fault.hold_s)
    elif fault.kind == "freeze-controller":
        lifted = await stack.freeze_controller(fault.hold_s)
    elif fault.kind == "cut-broker":
        lifted = await stack.cut_broker()
    elif fault.kind == "freeze-broker":
        lifted = await stack.freeze_broker(fault.hold_s)
    elif fault.kind == "down-broker":
        lifted = await stack.down_broker(fault.hold_s)
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")
    return lifted


async def run_nemesis(
    faults: Sequence[PlannedFault],
    stack: FaultStack,
    origin: float,
    applied: list[FaultWindow],
    calm_s: float = CALM_S,
) -> None:
    """Inflict ``faults`` at their times after ``origin`` (time.time()), one at a time, at
    least ``calm_s`` after the previous one was over."""
    calm_until = origin
    for fault in faults:
        delay = max(origin + fault.at_s, calm_until) - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.time()
        try:
            lifted = await inflict(fault, stack)
        except asyncio.CancelledError:
            # The campaign's deadline came while this fault held: it counts, lifted now.
            applied.append(FaultWindow(fault.kind, started, time.time()))
            raise
        window = FaultWindow(fault.kind, started, lifted)
        calm_until = time.time() + calm_s
        applied.append(window)
        log.info(
            "fault",
            kind=fault.kind,
            target=fault.target if fault.kind.endswith("worker") else None,
            at_s=round(window.started - origin, 2),
            held_s=round(window.lifted - window.started, 2),
        )
