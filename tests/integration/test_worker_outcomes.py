"""A worker keeps the outcome of a step it ran, whatever the broker did meanwhile."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import Event, StepStarted
from conveyor.service.engine import EMBEDDED_ANNOUNCE_AFTER_S
from conveyor.workers.broker_inprocess import InProcessBroker
from conveyor.workers.rabbitmq_errors import BrokerUnavailable

RAN: Counter[str] = Counter()


ANNOUNCED_AFTER_S = EMBEDDED_ANNOUNCE_AFTER_S * 3


@step
def first() -> int:
    RAN["first"] += 1
    time.sleep(ANNOUNCED_AFTER_S)  # long enough for the worker to announce its start
    return 1


@step
def second(x: int) -> int:
    RAN["second"] += 1
    time.sleep(ANNOUNCED_AFTER_S)
    return x + 1


@pipeline
def chain() -> None:
    second(first())


async def test_a_step_started_the_broker_never_took_does_not_cost_the_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker went down just after the step started: its StepStarted gave up (after
    publish_timeout_s) while the step ran. The step's outcome is published all the same;
    before, the worker dropped it and the step ran again, for ever."""
    refused = Counter[str]()
    original = InProcessBroker.publish

    async def publish(self: InProcessBroker, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, StepStarted):
                refused[event.step] += 1
                raise BrokerUnavailable("RabbitMQ did not confirm 1 message(s) within 60s")
        await original(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", publish)
    RAN.clear()
    async with Conveyor() as cv:
        run = await cv.submit(chain)
        record = await run.wait(timeout=30)
        steps = {s.name: (s.status, s.attempt) for s in await run.steps()}
        assert await run.load("second") == 2
    assert refused == {"first": 1, "second": 1}, "the fault was never injected"
    assert record.status is RunStatus.COMPLETED
    assert steps == {"first": (StepStatus.COMPLETED, 1), "second": (StepStatus.COMPLETED, 1)}
    assert RAN == {"first": 1, "second": 1}
