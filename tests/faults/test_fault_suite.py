"""The fault suite, CI form: runs of a small DAG on real processes while a nemesis strikes.

A controller and two workers (real ``conveyor`` processes, on a vhost of their own, behind
a TCP proxy) run 30 runs of ``ledger_dag`` (source, a fan-out of three, a join, a report)
submitted one every 1.25 s, while the nemesis applies twelve faults, two of each kind, in a
seeded order: SIGKILL a worker or the controller (each restarted), SIGSTOP a worker for a
few seconds, cut every broker connection, blackhole them for a few seconds, make the broker
go away for a few seconds (connections cut and refused). The checker then
counts what happened (see ``tests/faults/checker.py``) and every count that must be zero is
asserted zero. ``benchmarks/soak.py`` runs the same campaign longer.

``CONVEYOR_FAULT_KINDS`` (e.g. ``kill-worker,cut-broker``) and ``CONVEYOR_FAULT_SEED``
choose other kinds or another order when looking at one failure mode.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.faults.campaign import Campaign, report, run_campaign
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
    assert verdict.completed + verdict.failed_with_reason == campaign.runs, text
