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

from tests.faults.checker import (
    FaultWindow,
    Recovery,
    Verdict,
    check,
    latencies,
    parse_ledger,
    recovery_times,
)
from tests.faults.harness import FaultStack, UnplannedExit, submit_runs
from tests.faults.nemesis import HOLD_S, KINDS, plan, run_nemesis

FAULT_SPAN = 0.7
"""Faults are planned over this share of the submissions' time: freezes and restarts push
them later, and a fault after the last run finished tests nothing."""


@dataclass(frozen=True)
class Campaign:
    runs: int = 36
    every_s: float = 1.25  # between two submissions
    faults: int = 14
    kinds: tuple[str, ...] = KINDS
    seed: int = 1
    workers: int = 2
    concurrency: int = 2
    width: int = 3  # branches of the fan-out
    work_s: float = 0.2  # what each step body sleeps
    settle_s: float = 60.0  # after the last submission: runs unfinished then are stuck
    lease_s: float = 2.5  # how long a running step is its worker's without a heartbeat
    hold_s: tuple[float, float] = HOLD_S  # how long freezes and outages last: min, max


@dataclass
class Outcome:
    campaign: Campaign
    verdict: Verdict
    faults: list[FaultWindow]
    recoveries: list[Recovery]
    unplanned: list[UnplannedExit]
    elapsed_s: float
    settled_s: float  # from the last submission until every run finished (or the deadline)
    latencies: list[float] = field(default_factory=list)  # submission to completion, per run


async def run_campaign(campaign: Campaign, vhost_url: str, workdir: Path) -> Outcome:
    """Start the stack, submit runs under the nemesis, wait for them, check what happened."""
    stack = FaultStack(
        vhost_url,
        workdir,
        workers=campaign.workers,
        concurrency=campaign.concurrency,
        lease_s=campaign.lease_s,
    )
    async with stack:
        origin = time.time()
        span_s = campaign.runs * campaign.every_s * FAULT_SPAN
        faults = plan(
            campaign.seed,
            campaign.kinds,
            campaign.faults,
            span_s,
            campaign.workers,
            hold_s=campaign.hold_s,
        )
        submitted: list[tuple[str, float]] = []
        applied: list[FaultWindow] = []
        parameters = {"width": campaign.width, "work_s": campaign.work_s}
        nemesis = asyncio.create_task(run_nemesis(faults, stack, origin, applied), name="nemesis")
        try:
            await submit_runs(vhost_url, campaign.runs, campaign.every_s, parameters, submitted)
            calm = time.time()
            ids = {run_id for run_id, _ in submitted}
            await _settle(stack, ids, nemesis, campaign.settle_s)
            settled_s = time.time() - calm
            # Read at the deadline, while a fault that outlasts it still holds.
            runs = await stack.runs()
        finally:
            nemesis.cancel()  # lifts what it holds (its freezes resume in a finally)
            await asyncio.gather(nemesis, return_exceptions=True)
        step_times, run_times = await stack.completion_times()
    integrity = await asyncio.to_thread(stack.integrity)
    dead = await stack.dead_letters()
    executions = parse_ledger(stack.ledger.read_text())
    verdict = check([r for r, _ in submitted], runs, executions, dead, integrity)
    return Outcome(
        campaign=campaign,
        verdict=verdict,
        faults=applied,
        recoveries=recovery_times(applied, step_times, run_times.values(), origin),
        unplanned=stack.unplanned,
        elapsed_s=time.time() - origin,
        settled_s=settled_s,
        latencies=latencies(dict(submitted), run_times),
    )


async def _settle(
    stack: FaultStack, run_ids: set[str], nemesis: asyncio.Task[None], limit_s: float
) -> None:
    """Wait until every run finished and the nemesis is through, or ``limit_s`` passed
    since the last submission (runs unfinished then are stuck)."""
    deadline = time.monotonic() + limit_s
    while True:
        if nemesis.done() and not nemesis.cancelled() and nemesis.exception() is not None:
            raise RuntimeError("the nemesis failed") from nemesis.exception()
        unfinished = await stack.unfinished(run_ids)
        if (not unfinished and nemesis.done()) or time.monotonic() > deadline:
            return
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
        f"campaign: {campaign.runs} runs, {len(outcome.faults)} of {campaign.faults} faults "
        f"({', '.join(campaign.kinds)}), seed {campaign.seed}, {campaign.workers} workers x "
        f"{campaign.concurrency}; {outcome.elapsed_s:.0f}s in all, settled in "
        f"{outcome.settled_s:.1f}s",
        _table(["count", "value"], [[k, str(v)] for k, v in verdict.counts().items()]),
    ]
    if outcome.latencies:
        values = outcome.latencies
        p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
        parts.append(
            f"run latency s (submitted to completed): median {statistics.median(values):.1f}, "
            f"p95 {p95:.1f}, max {values[-1]:.1f}"
        )
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
    for exit_ in outcome.unplanned:
        last = exit_.tail.strip().splitlines()[-2:]
        parts.append(
            f"unplanned exit of {exit_.label} (status {exit_.code}, restarted by the harness):\n"
            + "\n".join(f"  {line[:300]}" for line in last)
        )
    for error, n in verdict.failures.most_common():
        parts.append(f"failed with reason x{n}: {error[:200]}")
    for letter in verdict.dead_letters:
        parts.append(f"dead letter: {letter.type} {letter.run_id} {letter.step}: {letter.reason}")
    problems = verdict.problems()
    verdict_line = "PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems)
    if outcome.unplanned:
        verdict_line += f"\n({len(outcome.unplanned)} processes exited on their own)"
    parts.append(verdict_line)
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
