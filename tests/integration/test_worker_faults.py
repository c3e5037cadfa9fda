"""Steps and workers that misbehave must not hold a stack: issue "nothing stops a stack".

Real RabbitMQ (a vhost per test), real controller and worker processes, real signals.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from conveyor.contracts import RunStatus, StepStatus
from conveyor.service.client import Client
from conveyor.workers.crash import CRASH_ENV
from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import (
    PIPELINES,
    STACK,
    Process,
    Processes,
    cancel_while_its_step_runs,
    markers,
    only_run,
    processes,
    register_stack,
    release,
    starts,
    vhost,
    wait_until,
)

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


# With the cache off, the chain's steps ride on the first one's StepReady: each worker
# forwards the next (docs/reliability.md); the guarantees must hold either way.
CACHE_ON_AND_OFF = pytest.mark.parametrize("cache", [[], ["--no-cache"]], ids=["cache", "riders"])


@CACHE_ON_AND_OFF
def test_a_step_that_kills_its_worker_fails_after_three_deliveries_and_the_run_ends(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes, cache: list[str]
) -> None:
    # Today: the StepReady is redelivered to every new worker for ever, the run never ends.
    # With the cache off, ``suicide`` rides on ``seed`` and may first run in place, inside
    # seed's delivery, which is not one of its own: it may kill one worker more.
    allowed = 4 if cache else 3
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    follower = processes.start("run", "pipeline", "run", f"{PIPELINES}:doomed", *cache)
    deaths = 0

    def start_worker(label: str) -> Process:  # it may die before it says it started
        return processes.start(label, "worker", "start", "--stack", STACK, "--name", label)

    worker = start_worker("w0")
    deadline = time.monotonic() + 120
    while follower.alive and time.monotonic() < deadline:
        if not worker.alive:  # what a supervisor does: start another one
            assert worker.wait() == -signal.SIGKILL, worker.output()[-2000:]
            deaths += 1
            assert deaths <= allowed, "the step was delivered again after three deaths"
            worker = start_worker(f"w{deaths}")
        time.sleep(0.05)
    assert follower.wait(30) == 1, processes.dump()
    assert worker.alive, "the fourth worker gives the step up instead of running it"
    assert deaths in {3, allowed}
    with Client() as client:
        run = only_run(client)
        assert run.status is RunStatus.FAILED
        steps = {s.name: s for s in client.get_steps(run.id)}
    assert steps["seed"].status is StepStatus.COMPLETED
    assert steps["suicide"].status is StepStatus.FAILED
    assert "died 3 times" in (steps["suicide"].error or "")
    assert steps["plus"].status is StepStatus.SKIPPED
    assert [name for name, _ in starts(markers)].count("suicide") == deaths


def chain_with_a_worker_killed(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes, crash_at: str, flow: str
) -> list[str]:
    """Run ``flow`` (the cache off) while its first worker dies at ``crash_at`` and a
    second takes over; check that the run completed with each step's outcome recorded
    once, from its one attempt (those heard again are ignored); the steps run."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    crashing = processes.start(
        "w1",
        *("worker", "start", "--stack", STACK, "--name", "w1"),
        env={CRASH_ENV: crash_at},
    )
    crashing.wait_for_log("worker started")
    follower = processes.start("run", "pipeline", "run", f"{PIPELINES}:{flow}", "--no-cache")
    assert crashing.wait(60) == -signal.SIGKILL, processes.dump()
    processes.worker("w2")
    assert follower.wait(60) == 0, processes.dump()
    with Client() as client:
        run = only_run(client)
        steps = {s.name: s for s in client.get_steps(run.id)}
    assert run.status is RunStatus.COMPLETED
    assert {(s.status, s.attempt) for s in steps.values()} == {(StepStatus.COMPLETED, 1)}
    return [name for name, _ in starts(markers)]


def test_a_worker_killed_between_forwarding_a_step_and_its_ack_loses_nothing(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # The window riders add: ``first`` takes longer than a rider may wait to run in place,
    # so its worker forwards ``middle``; the completion of ``first`` and the StepReady of
    # ``middle`` it forwards are confirmed, the worker dies before it acks its delivery
    # (``seed``'s, on which ``first`` ran in place).
    crash_at = "after-publish:StepReady:plus_2"
    ran = chain_with_a_worker_killed(vhost, tmp_path, markers, processes, crash_at, "slow_relay")
    # Delivered again: the ack of their delivery died with its worker.
    assert ran.count("seed") == 2 and ran.count("first") == 2, ran
    # ``middle`` was forwarded twice, so the rest of the chain may run twice, no more.
    assert 1 <= ran.count("middle") <= 2 and 1 <= ran.count("last") <= 2, ran


def test_a_worker_killed_in_a_chain_it_runs_in_place_loses_nothing(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # The chain's steps run one after the other on the worker that took the first. The
    # outcomes of ``seed`` and ``first`` go out together while ``middle`` runs, and the
    # worker dies once they are confirmed, before its ack: the delivery comes again.
    crash_at = "after-publish:StepSucceeded:plus"
    ran = chain_with_a_worker_killed(vhost, tmp_path, markers, processes, crash_at, "paced_relay")
    # The delivery the first worker held runs again from its first step; ``seed`` is that
    # step unless it took too long to let ``first`` run in place (a slow machine).
    assert ran.count("seed") in {1, 2} and ran.count("first") == 2, ran
    assert ran.count("middle") == 2 and ran.count("last") == 1, ran


def test_a_worker_killed_while_it_runs_siblings_loses_nothing(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # The 24 branches of ``wide`` go out three to a message. The worker dies once the
    # outcome of ``plus_5`` (branch-4), sent with its siblings', is confirmed, before the
    # message that carried them is acked: delivered again, the message is split, each of
    # its steps a message of its own, and branch-4 runs again (its outcome, recorded
    # already, is ignored: the run may have ended first).
    crash_at = "after-publish:StepSucceeded:plus_5"
    ran = chain_with_a_worker_killed(vhost, tmp_path, markers, processes, crash_at, "wide")
    assert all(ran.count(f"branch-{i}") in {1, 2} for i in range(24)), ran
    assert ran.count("join") == 1, ran
    again = "branch-4 run again from the message delivered again"
    wait_until(lambda: [n for n, _ in starts(markers)].count("branch-4") == 2, again, 30)


def test_a_branch_that_kills_its_worker_fails_alone_and_its_siblings_complete(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # ``suicide`` travels with two ``plus`` branches as siblings. Given up with its message
    # after three deliveries, it would take them down with it: a message delivered again
    # is split first, so that the poison step is alone for its next deliveries. It kills
    # one worker more than a step that came alone (the message's own delivery). One slot
    # a worker: a branch that runs beside ``suicide`` dies with it, message or not.
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    follower = processes.start("run", "pipeline", "run", f"{PIPELINES}:doomed_branch")
    deaths = 0

    def start_worker(label: str) -> Process:  # it may die before it says it started
        args = ("worker", "start", "--stack", STACK, "--name", label, "--concurrency", "1")
        return processes.start(label, *args)

    worker = start_worker("w0")
    deadline = time.monotonic() + 120
    while follower.alive and time.monotonic() < deadline:
        if not worker.alive:
            assert worker.wait() == -signal.SIGKILL, worker.output()[-2000:]
            deaths += 1
            assert deaths <= 4, "the step was delivered again after it was given up"
            worker = start_worker(f"w{deaths}")
        time.sleep(0.05)
    assert follower.wait(30) == 1, processes.dump()
    assert deaths == 4
    with Client() as client:
        run = only_run(client)
        steps = {s.name: s for s in client.get_steps(run.id)}
    assert run.status is RunStatus.FAILED
    assert steps["suicide"].status is StepStatus.FAILED
    assert "died 3 times" in (steps["suicide"].error or "")
    branches = {n: (s.status, s.attempt) for n, s in steps.items() if n.startswith("plus")}
    assert len(branches) == 23
    assert set(branches.values()) == {(StepStatus.COMPLETED, 1)}, branches


@CACHE_ON_AND_OFF
def test_a_frozen_worker_loses_its_step_to_another_and_its_late_outcome_is_fenced_off(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes, cache: list[str]
) -> None:
    # Today: a SIGSTOPped worker holds its step for as long as it is frozen.
    asyncio.run(register_stack(vhost, tmp_path / "artifacts", heartbeat_s=0.5, lease_s=3.0))
    processes.controller()
    workers = {w.pid: w for w in (processes.worker("w1"), processes.worker("w2"))}
    follower = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain", *cache)
    client = Client()

    def gated_status() -> StepStatus | None:
        runs = client.list_runs()
        steps = {s.name: s.status for s in client.get_steps(runs[0].id)} if runs else {}
        return steps.get("gated")

    wait_until(lambda: gated_status() is StepStatus.RUNNING, "the gated step to run")
    client.close()
    [first_pid] = [pid for name, pid in starts(markers) if name == "gate"]
    frozen = workers[first_pid]
    frozen.send(signal.SIGSTOP)
    try:
        wait_until(
            lambda: [n for n, _ in starts(markers)].count("gate") == 2,
            "a second attempt of the gated step on the other worker",
            timeout=30,
        )
        [(_, second_pid)] = [(n, p) for n, p in starts(markers) if n == "gate"][1:]
        assert second_pid != first_pid
        release(markers, "gate")
        assert follower.wait(60) == 0, processes.dump()
    finally:
        frozen.send(signal.SIGCONT)
    # The resumed worker hears that its attempt was taken over, or finishes it late (with
    # the cache off, running its rider in place on it): either way the recorded step stays
    # the second attempt's.
    wait_until(
        lambda: "attempt" in frozen.output() or ("last", first_pid) in starts(markers),
        "the resumed worker to stop its attempt or finish it",
        timeout=30,
    )
    time.sleep(2)
    with Client() as client:
        run = only_run(client)
        steps = {s.name: s for s in client.get_steps(run.id)}
    assert run.status is RunStatus.COMPLETED
    assert steps["gated"].status is StepStatus.COMPLETED and steps["gated"].attempt == 2
    assert steps["gated"].pid == second_pid
    # With the cache off it rode on the gated step's first attempt, then on its second,
    # and ran once: its first attempt.
    assert steps["plus"].status is StepStatus.COMPLETED and steps["plus"].attempt == 1
    assert frozen.alive


def test_run_cancel_stops_a_step_running_on_a_remote_worker(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # Today: cancellation stops at the queue; the running step goes on to its end.
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    worker = processes.worker("w1")
    run_id = cancel_while_its_step_runs(markers, processes)
    with Client() as client:
        steps = {s.name: s.status for s in client.get_steps(run_id)}
    assert steps == {
        "seed": StepStatus.COMPLETED,
        "waiting": StepStatus.CANCELLED,
        "plus": StepStatus.CANCELLED,
    }
    worker.wait_for_log("attempts stopped")
    assert worker.alive


def test_a_cancelled_sync_step_that_keeps_running_gets_its_worker_replaced(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    # Today: the cancelled step's thread holds the worker's only slot for as long as it
    # runs, and the worker looks healthy meanwhile: the next run waits.
    asyncio.run(register_stack(vhost, tmp_path / "artifacts", concurrency=1))
    processes.controller()
    worker = processes.worker("w1")
    first = processes.start("first", "pipeline", "run", f"{PIPELINES}:gated_chain")
    wait_until(lambda: any(n == "gate" for n, _ in starts(markers)), "the gated step to start")
    with Client() as client:
        run_id = only_run(client).id
    assert conveyor_cli("run", "cancel", run_id).returncode == 0
    assert first.wait(60) == 1
    # The gate is never released: its thread still waits. The worker says it is stuck and
    # exits for its supervisor, which starts another that runs the next run.
    assert worker.wait(60) == 4, worker.output()[-3000:]
    assert "attempts stopped" in worker.output()
    processes.worker("w2")
    second = processes.start("second", "pipeline", "run", f"{PIPELINES}:small")
    assert second.wait(60) == 0, processes.dump()
