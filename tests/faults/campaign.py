"""A fault campaign: runs submitted at a steady rate while the nemesis strikes, then checked.

Shared by the CI form (``tests/faults/test_fault_suite.py``) and the soak
(``benchmarks/soak.py``), which differ only in their :class:`Campaign`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tests.faults.checker import (
    FaultWindow,
    Recovery,
    Verdict,
    check,
    parse_ledger,
    recovery_times,
)
from tests.faults.harness import FaultStack, UnplannedExit, submit_runs
from tests.faults.nemesis import KINDS, plan, run_nemesis

log = structlog.get_logger("conveyor.faults")


@dataclass(frozen=True)
class Campaign:
    runs: int = 24
    every_s: float = 1.25  # between two submissions
    faults: int = 10
    kinds: tuple[str, ...] = KINDS
    seed: int = 1
    workers: int = 2
    concurrency: int = 2
    width: int = 3  # branches of the fan-out
    work_s: float = 0.2  # what each step body sleeps
    settle_s: float = 60.0  # after the last submission and fault, for runs to finish


@dataclass
class Outcome:
    campaign: Campaign
    verdict: Verdict
    faults: list[FaultWindow]
    recoveries: list[Recovery]
    unplanned: list[UnplannedExit]
    elapsed_s: float
    settled_s: float  # from the end of submissions and faults until every run finished
    unfinished: list[str] = field(default_factory=list)


async def run_campaign(campaign: Campaign, vhost_url: str, workdir: Path) -> Outcome:
    """Start the stack, submit runs under the nemesis, wait for them, check what happened."""
    stack = FaultStack(
        vhost_url, workdir, workers=campaign.workers, concurrency=campaign.concurrency
    )
    async with stack:
        origin = time.time()
        span_s = campaign.runs * campaign.every_s
        faults = plan(campaign.seed, campaign.kinds, campaign.faults, span_s, campaign.workers)
        submitted: list[tuple[str, float]] = []
        applied: list[FaultWindow] = []
        parameters = {"width": campaign.width, "work_s": campaign.work_s}
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(
                submit_runs(vhost_url, campaign.runs, campaign.every_s, parameters, submitted)
            )
            tasks.create_task(run_nemesis(faults, stack, origin, applied))
        calm = time.time()
        unfinished = await _settle(stack, {run_id for run_id, _ in submitted}, campaign.settle_s)
        settled_s = time.time() - calm
        runs = await stack.runs()
        step_times, run_times = await stack.completion_times()
    integrity = await asyncio.to_thread(stack.integrity)
    dead = await stack.dead_letters()
    executions = parse_ledger(stack.ledger.read_text())
    verdict = check([r for r, _ in submitted], runs, executions, dead, integrity)
    return Outcome(
        campaign=campaign,
        verdict=verdict,
        faults=applied,
        recoveries=recovery_times(applied, step_times, run_times, origin),
        unplanned=stack.unplanned,
        elapsed_s=time.time() - origin,
        settled_s=settled_s,
        unfinished=sorted(unfinished),
    )


async def _settle(stack: FaultStack, run_ids: set[str], limit_s: float) -> set[str]:
    """Wait until every run finished or ``limit_s`` passed; the runs still unfinished."""
    deadline = time.monotonic() + limit_s
    while True:
        unfinished = await stack.unfinished(run_ids)
        if not unfinished or time.monotonic() > deadline:
            return unfinished
        await asyncio.sleep(0.5)


# --- the report ---


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def report(outcome: Outcome, *, per_fault: bool = True) -> str:
    """The counts, recovery times (per fault and per kind) and findings, as text tables."""
    verdict = outcome.verdict
    campaign = outcome.campaign
    parts = [
        f"campaign: {campaign.runs} runs, {len(outcome.faults)} faults "
        f"({', '.join(campaign.kinds)}), seed {campaign.seed}, {campaign.workers} workers x "
        f"{campaign.concurrency}; {outcome.elapsed_s:.0f}s in all, settled in "
        f"{outcome.settled_s:.1f}s",
        _table(["count", "value"], [[k, str(v)] for k, v in verdict.counts().items()]),
    ]
    if per_fault and outcome.recoveries:
        rows = [
            [
                r.kind,
                f"{r.at_s:.1f}",
                f"{r.held_s:.1f}",
                _seconds(r.to_next_step_s),
                _seconds(r.to_next_run_s),
            ]
            for r in outcome.recoveries
        ]
        parts.append(_table(["fault", "at s", "held s", "to next step s", "to next run s"], rows))
    parts.append(
        _table(
            ["fault kind", "n", "next step s (median/max)", "next run s"],
            _by_kind(outcome.recoveries),
        )
    )
    if outcome.unplanned:
        parts.append(
            "unplanned exits (restarted by the harness): "
            + ", ".join(f"{u.label} (exit {u.code})" for u in outcome.unplanned)
        )
    for error, n in verdict.failures.most_common():
        parts.append(f"failed with reason x{n}: {error[:200]}")
    for letter in verdict.dead_letters:
        parts.append(f"dead letter: {letter.type} {letter.run_id} {letter.step}: {letter.reason}")
    problems = verdict.problems()
    parts.append("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return "\n\n".join(parts)


def _by_kind(recoveries: list[Recovery]) -> list[list[str]]:
    rows = []
    for kind in KINDS:
        mine = [r for r in recoveries if r.kind == kind]
        if not mine:
            continue
        rows.append([kind, str(len(mine)), _spread(mine, "step"), _spread(mine, "run")])
    return rows


def _spread(recoveries: list[Recovery], what: str) -> str:
    values = [
        v
        for r in recoveries
        if (v := r.to_next_step_s if what == "step" else r.to_next_run_s) is not None
    ]
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"
