"""A failed controller batch, without a controller or a broker: the message that fails it is
dead-lettered and the rest proceed; a failing store or broker blames no message, hands the
batch back and backs off until a batch goes through."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conveyor.contracts import Event, RunCancelRequested, new_id
from conveyor.service import batch_failures
from conveyor.service.batch_failures import BatchFailures
from conveyor.service.store import Database
from conveyor.service.unreadable import Inbound


class FakeDelivery:
    """A delivery that remembers how it was settled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.settled: list[str] = []
        self._event = RunCancelRequested(run_id=new_id())

    @property
    def event(self) -> Event:
        return self._event

    @property
    def deliveries(self) -> int:
        return 1

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, reason: str) -> None:
        self.settled.append(f"reject: {reason}")

    async def requeue(self) -> None:
        self.settled.append("requeue")


class Rig:
    """``BatchFailures`` around a ``process`` that fails on the deliveries named in
    ``failing`` (each with its error, raised as many times as it is listed)."""

    def __init__(self, db: Database) -> None:
        self.failing: dict[str, list[BaseException]] = {}
        self.processed: list[str] = []
        self.forgotten = 0
        self.unpublished = False
        self.broker_lost_by: str | None = None
        """A delivery whose processing, failed or not, leaves events unpublished."""
        self.failures = BatchFailures(
            db,
            "prod",
            process=self._process,
            forget=self._forget,
            unpublished=lambda: self.unpublished,
        )

    async def _process(self, deliveries: list[Inbound]) -> None:
        for delivery in deliveries:
            assert isinstance(delivery, FakeDelivery)
            if delivery.name == self.broker_lost_by:
                self.unpublished = True
            errors = self.failing.get(delivery.name)
            if errors:
                raise errors.pop(0)
        for delivery in deliveries:
            assert isinstance(delivery, FakeDelivery)
            self.processed.append(delivery.name)
            await delivery.ack()

    def _forget(self) -> None:
        self.forgotten += 1


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setattr(batch_failures, "BACK_OFF_S", 0.001)
    monkeypatch.setattr(batch_failures, "BACK_OFF_MAX_S", 0.004)
    async with Database(tmp_path / "conveyor.db") as db:
        yield Rig(db)


def batch(*names: str) -> list[FakeDelivery]:
    return [FakeDelivery(name) for name in names]


async def test_the_message_that_fails_its_batch_is_dead_lettered_and_the_rest_proceed(
    rig: Rig,
) -> None:
    deliveries = batch("a", "poison", "b")
    rig.failing["poison"] = [KeyError("ghost")] * 2
    await rig.failures.failed(list(deliveries), KeyError("ghost"))
    assert rig.processed == ["a", "b"]
    a, poison, b = (d.settled for d in deliveries)
    assert a == b == ["ack"]
    assert poison == ["reject: the controller cannot process it: KeyError: 'ghost'"]
    assert rig.failures.problem is None
    assert rig.forgotten == 3  # the batch, then the poison message alone, twice


async def test_a_message_that_fails_once_alone_is_not_to_blame(rig: Rig) -> None:
    deliveries = batch("a", "flaky")
    rig.failing["flaky"] = [RuntimeError("hiccup")]
    await rig.failures.failed(list(deliveries), RuntimeError("hiccup"))
    assert rig.processed == ["a", "flaky"]
    assert all(d.settled == ["ack"] for d in deliveries)


async def test_a_failing_store_blames_no_message_and_backs_off_until_a_batch_goes_through(
    rig: Rig, tmp_path: Path
) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    deliveries = batch("a", "b", "c")
    rig.failing["b"] = [full]
    await rig.failures.failed(list(deliveries), full)
    assert rig.processed == ["a"]
    assert [d.settled for d in deliveries] == [["ack"], ["requeue"], ["requeue"]]
    problem = rig.failures.problem
    assert problem is not None
    assert f"the metadata store {tmp_path / 'conveyor.db'}" in problem, problem
    assert "is its disk full?" in problem and "failed 1 time(s) in a row" in problem, problem
    await rig.failures.failed([], full)
    assert "failed 2 time(s) in a row" in (rig.failures.problem or "")
    rig.failures.recovered()
    assert rig.failures.problem is None
    await rig.failures.failed([], RuntimeError("again"))
    assert "failed 1 time(s) in a row" in (rig.failures.problem or "")


async def test_events_recorded_but_not_published_blame_the_broker_not_a_message(
    rig: Rig,
) -> None:
    deliveries = batch("a", "b")
    rig.unpublished = True
    await rig.failures.failed(list(deliveries), ConnectionError("broker gone"))
    assert rig.processed == []
    assert [d.settled for d in deliveries] == [["requeue"], ["requeue"]]
    assert (rig.failures.problem or "").startswith("the broker did not take the events")


async def test_a_message_is_not_dead_lettered_while_the_broker_holds_events_back(
    rig: Rig,
) -> None:
    """The broker failed while the message was processed alone: its error is the broker's."""
    deliveries = batch("poison")
    rig.failing["poison"] = [KeyError("ghost")] * 2
    rig.broker_lost_by = "poison"
    await rig.failures.failed(list(deliveries), KeyError("ghost"))
    assert deliveries[0].settled == ["requeue"]
    assert rig.failures.problem is not None
