"""Retries that wait, on the rabbitmq stack with a controller and a worker as processes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from conveyor.contracts import RunStatus, StepStatus
from conveyor.service.client import Client
from tests.integration.rabbitmq_support import (
    Processes,
    markers,
    only_run,
    processes,
    register_stack,
    vhost,
    wait_until,
)

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

PIPELINES = "tests/pipelines/retry_pipelines.py"


def attempts(markers: Path) -> list[tuple[str, float]]:
    path = markers / "attempts.log"
    if not path.exists():
        return []
    return [(n, float(t)) for n, t in (line.split() for line in path.read_text().splitlines())]


def times(markers: Path, name: str) -> list[float]:
    return [t for n, t in attempts(markers) if n == name]


def test_a_retry_waits_in_the_controller_while_the_one_slot_runs_other_steps(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1", "--concurrency", "1")
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:flaky_beside_ticks")
    assert run.wait(120) == 0, processes.dump()
    with Client() as client:
        record = only_run(client)
        steps = {s.name: s for s in client.get_steps(record.id)}
    assert record.status is RunStatus.COMPLETED
    assert (steps["flaky"].status, steps["flaky"].attempt) == (StepStatus.COMPLETED, 3)
    starts, ends = times(markers, "flaky"), times(markers, "flaky-end")
    assert starts[1] - ends[0] >= 0.5 and starts[2] - ends[1] >= 1.0, attempts(markers)
    ticks = list(zip(times(markers, "tick"), times(markers, "tick-end"), strict=True))
    gaps = [(ends[0], starts[1]), (ends[1], starts[2])]
    during = [t for t in ticks for a, b in gaps if a <= t[0] and t[1] <= b]
    assert during, f"no step ran on the worker's one slot while flaky waited: {attempts(markers)}"


def test_a_controller_killed_during_a_retry_wait_dispatches_the_attempt_when_due(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    processes.worker("w1")
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:asks_later", "-p", "after=4")

    def waiting() -> bool:
        with Client() as client:
            runs = client.list_runs()
            return bool(runs) and client.get_steps(runs[0].id)[0].retry_at is not None

    wait_until(waiting, "the step to wait for its retry", timeout=60)
    controller.send(signal.SIGKILL)
    controller.wait()
    with Client() as client:
        (step,) = client.get_steps(only_run(client).id)
    assert step.retry_at is not None and step.attempt == 2
    processes.controller("controller-again")
    assert run.wait(90) == 0, processes.dump()
    with Client() as client:
        record = only_run(client)
        (done,) = client.get_steps(record.id)
    assert record.status is RunStatus.COMPLETED
    assert (done.status, done.attempt, done.retry_at) == (StepStatus.COMPLETED, 2, None)
    first, second = times(markers, "rate_limited")
    assert second >= step.retry_at.timestamp(), "not dispatched before it was due"
    assert second - first >= 4.0
