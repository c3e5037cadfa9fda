"""The controller loses nothing when its store or its broker fails in the middle of a batch."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import Event, StepReady
from conveyor.service.controller import Controller, _durable
from conveyor.service.store import Database, Writes
from conveyor.workers.broker_inprocess import InProcessBroker


@step
def start() -> int:
    return 1


@step
def add(x: int) -> int:
    return x + 1


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def diamond() -> None:
    s = start()
    total([add(add(s)), add(s), add(s)])


EACH_ONCE = {
    "start": (StepStatus.COMPLETED, 1),
    "add": (StepStatus.COMPLETED, 1),
    "add_2": (StepStatus.COMPLETED, 1),
    # add(s) twice more: the same work as "add", which they wait for and reuse.
    "add_3": (StepStatus.CACHED, 0),
    "add_4": (StepStatus.CACHED, 0),
    "total": (StepStatus.COMPLETED, 1),
}
"""Each step of ``diamond`` computed once, at its first attempt, whatever failed meanwhile."""


async def run_to_end() -> tuple[RunStatus, dict[str, Any], int]:
    async with Conveyor() as cv:
        run = await cv.submit(diamond)
        record = await run.wait(timeout=60)
        steps = await run.steps()
        return (
            record.status,
            {s.name: (s.status, s.attempt) for s in steps},
            await run.load("total"),
        )


async def test_a_failed_store_write_is_retried_and_the_run_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = {"n": 0}
    original = Database.write

    async def failing_write(self: Database, writes: Writes) -> None:
        calls["n"] += 1
        if calls["n"] in (3, 4):
            # A statement that fails after the batch's own ones: the whole transaction
            # must roll back, as after a disk error.
            writes.add("INSERT INTO no_such_table VALUES (?)", [(1,)])
        await original(self, writes)

    monkeypatch.setattr(Database, "write", failing_write)
    status, steps, value = await run_to_end()
    assert calls["n"] > 4, "the fault was never injected"
    assert status is RunStatus.COMPLETED
    assert value == 3 + 2 + 2
    assert steps == EACH_ONCE, steps


async def test_a_failed_publish_is_retried_and_nothing_runs_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = {"left": 2}
    original = InProcessBroker.publish

    async def flaky_publish(self: InProcessBroker, events: Sequence[Event]) -> None:
        if failures["left"] and any(isinstance(e, StepReady) for e in events):
            failures["left"] -= 1
            raise ConnectionError("broker went away")
        await original(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", flaky_publish)
    status, steps, value = await run_to_end()
    assert failures["left"] == 0, "the fault was never injected"
    assert status is RunStatus.COMPLETED and value == 7
    assert steps == EACH_ONCE, steps


async def test_a_stray_cancelled_error_from_the_broker_does_not_stop_the_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiormq cancels the confirms pending on a connection it gave up: the controller's
    # publish then raises CancelledError although nobody cancelled the controller.
    failures = {"left": 1}
    original = InProcessBroker.publish

    async def cancelled_publish(self: InProcessBroker, events: Sequence[Event]) -> None:
        if failures["left"] and any(isinstance(e, StepReady) for e in events):
            failures["left"] -= 1
            raise asyncio.CancelledError
        await original(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", cancelled_publish)
    status, steps, value = await run_to_end()
    assert failures["left"] == 0, "the fault was never injected"
    assert status is RunStatus.COMPLETED and value == 7
    assert steps == EACH_ONCE, steps


async def test_the_controller_goes_on_while_the_broker_confirms_and_notes_it_later(
    monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    # The broker takes the first StepReady of the `add` steps (its identical twins wait for
    # it, cached) but confirms it only when the gate opens: meanwhile the controller must
    # process the completions (the run ends) while that outbox row stays unsent; once
    # confirmed, it is noted sent.
    gate = asyncio.Event()
    held: list[str] = []
    original = InProcessBroker.publish

    async def slow_confirm(self: InProcessBroker, events: Sequence[Event]) -> None:
        await original(self, events)
        ready = [e for e in events if isinstance(e, StepReady)]
        if not held and ready and all(e.step.name.startswith("add") for e in ready):
            held.extend(e.event_id for e in ready)
            await gate.wait()

    monkeypatch.setattr(InProcessBroker, "publish", slow_confirm)
    # An embedded controller keeps no outbox (nothing would replay it): this one keeps
    # one, as a service controller does.
    monkeypatch.setattr(Controller, "_kept", lambda self, event: _durable(event))
    async with Conveyor() as cv:
        run = await cv.submit(diamond)
        record = await run.wait(timeout=60)
        assert record.status is RunStatus.COMPLETED and await run.load("total") == 7
        assert held and _unsent(home) >= set(held)
        gate.set()
        deadline = asyncio.get_running_loop().time() + 30
        while _unsent(home):
            assert asyncio.get_running_loop().time() < deadline, _unsent(home)
            await asyncio.sleep(0.02)


async def test_an_embedded_controller_keeps_no_outbox(home: Path) -> None:
    # Its runs end with its process, and its broker's messages with them: nothing would
    # ever replay an outbox, so it writes none.
    status, _, value = await run_to_end()
    assert status is RunStatus.COMPLETED and value == 7
    with contextlib.closing(sqlite3.connect(home / "conveyor.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def _unsent(home: Path) -> set[str]:
    """The outbox rows that the controller has not noted confirmed."""
    with contextlib.closing(sqlite3.connect(home / "conveyor.db")) as db:
        return {row[0] for row in db.execute("SELECT event_id FROM outbox WHERE sent IS NULL")}
