"""A fan-out's branches travel a dozen to a message (``StepReady.siblings``), on the
embedded stack: each runs once, long ones spread over every worker, and one that a worker
refuses is dead-lettered with its message. Each test says what would make it fail."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import Event, StepReady, StepSpec, UntrustedStep
from conveyor.service import batches
from conveyor.workers import runtime
from conveyor.workers.runtime import WorkerPool
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import StepDefinition
from tests.integration.test_embedded_chain_riders import outcomes_or_start, published
from tests.integration.test_riders_in_place import another_worker

RAN: Counter[str] = Counter()


@step
def origin() -> int:
    return 1


@step
def branch(x: int, i: int) -> int:
    RAN[f"branch-{i}"] += 1
    return x + i


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def fan_out(width: int) -> None:
    root = origin()
    total([branch(root, i=i) for i in range(width)])


def steps_carried(event: Event) -> list[str] | None:
    """The steps a StepReady message carries: its own, then its siblings'."""
    if not isinstance(event, StepReady):
        return None
    return [event.step.name, *(s.step.name for s in event.siblings)]


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
async def test_a_fan_out_of_100_goes_out_in_a_dozen_messages_and_each_branch_runs_once(
    cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without siblings, each branch is a message of its own: 102 messages for 102 steps.
    # With the cache on, the controller decides about each branch first (no earlier run has
    # its outputs): the misses go out together all the same.
    RAN.clear()
    async with Conveyor() as cv:
        messages = published(cv, monkeypatch, steps_carried)
        run = await cv.submit(fan_out, width=100, cache=cache)
        record = await run.wait(timeout=60)
        steps = await run.steps()
        result = await run.load("total")
    assert record.status is RunStatus.COMPLETED
    assert {(s.status, s.attempt) for s in steps} == {(StepStatus.COMPLETED, 1)}
    assert result == 100 + sum(range(100))
    assert {f"branch-{i}": 1 for i in range(100)} == RAN
    dispatched = [name for message in messages for name in message]
    assert sorted(dispatched) == sorted(s.name for s in steps)  # each step dispatched once
    assert len(messages) <= 12, [len(m) for m in messages]
    assert max(len(m) for m in messages) <= 16


async def test_the_outcomes_of_a_messages_siblings_reach_the_controller_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The 100 branches come a dozen to a message; the outcomes of a message's steps go out
    # together once each of its steps still running has one. Alone, each branch's outcome
    # was a message: 100 for the fan-out.
    RAN.clear()
    async with Conveyor() as cv:
        outcomes = published(cv, monkeypatch, outcomes_or_start)
        run = await cv.submit(fan_out, width=100, cache=False)
        record = await run.wait(timeout=60)
        branches = sorted(s.name for s in await run.steps() if s.name.startswith("branch"))
    assert record.status is RunStatus.COMPLETED
    carrying = [m for m in outcomes if any(name.startswith("branch") for name in m)]
    assert sorted(name for message in carrying for name in message) == branches
    assert len(carrying) <= 20, [len(m) for m in carrying]


@step(pool="wide")
def long_branch(x: int, i: int) -> int:
    RAN[f"long-{i}"] += 1
    time.sleep(0.4)
    return x + i


@pipeline
def long_fan_out() -> None:
    root = origin()
    for i in range(4):
        long_branch(root, i=i)


async def test_siblings_that_wait_for_a_slot_are_handed_back_to_an_idle_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four long branches in one message (bundling from 2 steps up, here), two workers of
    # one slot. The worker that takes the message runs one branch; the others wait for its
    # slot while the second worker idles, unless they are handed back. Held, all four run
    # on one worker, one after the other.
    monkeypatch.setattr(batches, "SPREAD", 1)
    monkeypatch.setattr(runtime, "HAND_BACK_S", 0.1)

    async def no_embedded_worker_for_wide(self: WorkerPool, pools: object) -> None:
        return None

    monkeypatch.setattr(WorkerPool, "serve", no_embedded_worker_for_wide)
    RAN.clear()
    async with Conveyor() as cv:
        messages = published(cv, monkeypatch, steps_carried)
        first = another_worker(cv, long_fan_out, "first", ["wide"], concurrency=1)
        second = another_worker(cv, long_fan_out, "second", ["wide"], concurrency=1)
        async with first, second:
            run = await cv.submit(long_fan_out, cache=False)
            record = await run.wait(timeout=60)
            workers = {s.name: s.worker for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED
    assert {f"long-{i}": 1 for i in range(4)} == RAN
    assert [len(m) for m in messages if len(m) > 1] == [4], messages
    handed_back = [m for m in messages if len(m) == 1 and m[0].startswith("long_branch")]
    assert handed_back, messages
    branch_workers = {w for name, w in workers.items() if name.startswith("long_branch")}
    assert branch_workers == {"first", "second"}, workers


@step
def trusted_origin() -> int:
    return 1


@step
def maybe_trusted(x: int, i: int) -> int:
    return x + i


@pipeline
def partly_refused() -> None:
    root = trusted_origin()
    for i in range(16):
        maybe_trusted(root, i=i)


async def test_a_sibling_refused_here_fails_alone_and_its_message_is_dead_lettered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This worker will not run maybe_trusted_3 (as a worker that does not trust its package
    # would not). Its siblings run and complete; the run hears that it failed; the message
    # that carried them goes to the dead letters once all of them are settled, the reason
    # naming the refused step. Were the refusal the message's, its siblings would be
    # dead-lettered unrun (the run waits for ever), or acked with it (nothing kept).
    resolved = StepResolver.resolved

    def refusing(self: StepResolver, spec: StepSpec) -> StepDefinition | None:
        if spec.name == "maybe_trusted_3":
            raise UntrustedStep("maybe_trusted_3 is not trusted here")
        return resolved(self, spec)

    monkeypatch.setattr(StepResolver, "resolved", refusing)
    async with Conveyor() as cv:
        messages = published(cv, monkeypatch, steps_carried)
        run = await cv.submit(partly_refused, cache=False)
        record = await run.wait(timeout=60)
        steps = {s.name: s for s in await run.steps()}
        dead = [(d.event, d.reason) for d in cv.broker.dead_letters]
    assert record.status is RunStatus.FAILED
    assert "not trusted here" in (steps["maybe_trusted_3"].error or "")
    others = {n: s.status for n, s in steps.items() if n != "maybe_trusted_3"}
    assert set(others.values()) == {StepStatus.COMPLETED}, others
    [carrier] = [m for m in messages if "maybe_trusted_3" in m]
    assert len(carrier) == 2, messages
    [(event, reason)] = dead
    assert isinstance(event, StepReady)
    assert [event.step.name, *(s.step.name for s in event.siblings)] == carrier
    assert reason.startswith("maybe_trusted_3: ") and "not trusted here" in reason
