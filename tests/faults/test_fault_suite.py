"""The fault suite, CI form: runs of a small DAG on real processes while a nemesis strikes.

A controller and two workers (real ``conveyor`` processes, on a vhost of their own, behind
a TCP proxy) run 36 runs of ``ledger_dag`` (source, a fan-out of three, a join, a report)
submitted one every 1.25 s, while the nemesis applies fourteen faults, two of each kind, in
a seeded order: SIGKILL a worker or the controller (each restarted), SIGSTOP a worker or the
controller for a few seconds, cut every broker connection, blackhole them for a few
seconds, make the broker go away for a few seconds (connections cut and refused). The
checker then counts what happened (see ``tests/faults/checker.py``); every count that must
be zero is asserted zero, and no process may exit on its own. ``benchmarks/soak.py`` runs
the same campaign longer.

``CONVEYOR_FAULT_KINDS`` (e.g. ``kill-worker,cut-broker``) and ``CONVEYOR_FAULT_SEED``
choose other kinds or another order when looking at one failure mode.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.faults.campaign import Campaign, report, run_campaign
from tests.faults.checker import check, parse_ledger
from tests.faults.harness import TOPOLOGY, FaultStack, publish_raw, submit_runs
from tests.faults.nemesis import parse_kinds
from tests.integration.rabbitmq_support import vhost

__all__ = ["vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


@pytest.mark.timeout(300)
def test_runs_under_faults_are_neither_lost_nor_stuck_nor_applied_twice(
    vhost: str, tmp_path: Path
) -> None:
    campaign = Campaign(
        kinds=parse_kinds(os.environ.get("CONVEYOR_FAULT_KINDS", "all")),
        seed=int(os.environ.get("CONVEYOR_FAULT_SEED", "1")),
    )
    outcome = asyncio.run(run_campaign(campaign, vhost, tmp_path))
    text = report(outcome)
    print(text)
    verdict = outcome.verdict
    assert verdict.submitted == campaign.runs, text
    assert len(outcome.faults) == campaign.faults, text
    assert verdict.problems() == [], text
    assert outcome.unplanned == [], text
    assert verdict.completed + verdict.failed_with_reason == campaign.runs, text


def test_the_checker_sees_what_the_stack_really_did(vhost: str, tmp_path: Path) -> None:
    """No faults, two runs and a poison message: the ledger, the marks and the dead letter
    are read from the real processes, broker and store."""

    async def scenario() -> None:
        async with FaultStack(vhost, tmp_path) as stack:
            submitted: list[tuple[str, float]] = []
            await submit_runs(vhost, 2, 0.1, {"width": 2, "work_s": 0.0}, submitted)
            await publish_raw(vhost, TOPOLOGY.runs_queue, b'{"type": "RunRequested"}')
            deadline = time.monotonic() + 60
            ids = {run_id for run_id, _ in submitted}
            while await stack.unfinished(ids):
                assert time.monotonic() < deadline, "the runs did not finish"
                await asyncio.sleep(0.2)
            runs = await stack.runs()
        executions = parse_ledger(stack.ledger.read_text())
        verdict = check(ids, runs, executions, await stack.dead_letters(), stack.integrity())
        assert verdict.completed == 2 and verdict.executions == 2 * 5
        assert [step.mark is not None for run in runs for step in run.steps] == [True] * 10
        [letter] = verdict.unexplained_dead_letters
        assert letter.type == "unparsable" and "invalid event" in letter.reason
        assert [p.split(":")[0] for p in verdict.problems()] == ["1 unexplained dead letters"]

    asyncio.run(scenario())
