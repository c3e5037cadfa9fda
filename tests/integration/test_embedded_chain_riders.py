"""Chain riders on the embedded stack: what a user sees of a chain's retries when
its run has the cache off (its steps ride) and when it has the cache on (they do not)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest

from conveyor import Conveyor, RunStatus, pipeline, step
from conveyor.contracts import (
    Delivery,
    Event,
    StepFailed,
    StepReady,
    StepSpec,
    StepStarted,
    StepStatus,
    StepSucceeded,
    UntrustedStep,
)
from conveyor.contracts.events import StepsDone
from conveyor.service.controller import Controller
from conveyor.service.store.db import MetadataStoreError
from conveyor.workers import outcomes, runtime
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import StepDefinition

T = TypeVar("T")
LOCK = threading.Lock()
CALLS: dict[str, int] = {}


def _call(name: str) -> int:
    with LOCK:
        CALLS[name] = CALLS.get(name, 0) + 1
        return CALLS[name]


@step(retries=1)
def first_link(key: str) -> str:
    if _call(f"first:{key}") == 1:
        raise ConnectionError("the service is not up yet")
    return key


@step(retries=1)
def second_link(key: str) -> str:
    if _call(f"second:{key}") == 1:
        raise ConnectionError("the service is not up yet")
    return key + "!"


@pipeline
def two_flaky_links(key: str) -> None:
    second_link(first_link(key=key))


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
async def test_each_link_of_a_chain_has_its_own_retry(cache: bool) -> None:
    # Each step fails once and may be retried once: the run completes. With the cache off,
    # second_link rides on first_link, and again on first_link's retry: that is not one of
    # its own failures, and its one failure must still be retried.
    key = f"retries-{cache}"
    async with Conveyor() as cv:
        run = await cv.submit(two_flaky_links, key=key, cache=cache)
        record = await run.wait(timeout=60)
        steps = {s.name: s for s in await run.steps()}
    assert CALLS[f"second:{key}"] >= 1
    assert record.status is RunStatus.COMPLETED, (
        f"second_link: {steps['second_link'].status.value}, attempt "
        f"{steps['second_link'].attempt}: {steps['second_link'].error}"
    )


@step
def steady_link(key: str) -> str:
    _call(f"steady:{key}")
    return key + "."


@pipeline
def flaky_then_steady(key: str) -> None:
    steady_link(first_link(key=key))


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
async def test_a_link_that_ran_once_shows_one_attempt(cache: bool) -> None:
    # What `conveyor run describe` shows under ATTEMPTS, and the dashboard as "attempt N
    # of M" with a "retried" mark: steady_link ran once and never failed. With the cache
    # off it rode on first_link's two attempts, and ran once: its attempt 1.
    key = f"shown-{cache}"
    async with Conveyor() as cv:
        run = await cv.submit(flaky_then_steady, key=key, cache=cache)
        record = await run.wait(timeout=60)
        steps = {s.name: s for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED
    assert CALLS[f"steady:{key}"] == 1
    assert (steps["first_link"].attempt, steps["steady_link"].attempt) == (2, 1)


@step
def parent_link() -> int:
    return 1


@step(retries=1)
def failing_rider(x: int) -> int:
    if _call("failing_rider") == 1:
        raise ConnectionError("the service is not up yet")
    return x + 1


@pipeline
def parent_and_rider() -> None:
    failing_rider(parent_link())


@pytest.mark.parametrize("cache", [True, False], ids=["cache-on", "cache-off"])
async def test_a_store_hiccup_on_a_parents_outcome_does_not_strand_its_rider(
    cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store is busy when the controller records parent_link's success: the batch is
    # handed back to the broker, and tried again after a pause. Meanwhile the StepFailed
    # of failing_rider (it rode, failed at once, retryable) waits in the controller's inbox
    # and is taken first: dispatching its retry needs parent_link's outputs, not recorded
    # yet (KeyError), and once taken apart that StepFailed goes to the dead letters. The
    # rider, never announced, stays pending at attempt 1 and the run never ends.
    CALLS.pop("failing_rider", None)
    process = Controller._process
    hiccups = [MetadataStoreError("database is locked")] * 2

    async def busy_store(self: Controller, deliveries: list[Delivery]) -> None:
        parent_done = any(
            isinstance(d.event, StepSucceeded) and d.event.step == "parent_link" for d in deliveries
        )
        if parent_done and hiccups:
            await asyncio.sleep(0.3)  # the rider runs and fails meanwhile
            raise hiccups.pop()
        await process(self, deliveries)

    monkeypatch.setattr(Controller, "_process", busy_store)
    async with Conveyor() as cv:
        run = await cv.submit(parent_and_rider, cache=cache)
        try:
            record = await run.wait(timeout=15)
        except TimeoutError:
            steps = {s.name: (s.status.value, s.attempt) for s in await run.steps()}
            raise AssertionError(f"the run never ended: {steps}") from None
    assert not hiccups
    assert record.status is RunStatus.COMPLETED


@step
def count_from(start: int) -> int:
    return start


@step
def count_on(x: int) -> int:
    return x + 1


@pipeline
def counting_chain(start: int) -> None:
    count_on(count_on(count_on(count_from(start=start))))


async def test_a_chain_run_with_the_cache_off_is_reused_by_a_run_with_the_cache_on() -> None:
    # Its steps after the first rode: their cache keys were recorded once the step before
    # each had finished, so that the next run finds every output.
    async with Conveyor() as cv:
        first_run = await cv.submit(counting_chain, start=7, cache=False)
        first = await first_run.wait(timeout=60)
        second_run = await cv.submit(counting_chain, start=7)
        second = await second_run.wait(timeout=60)
        statuses = {s.name: s.status for s in await second_run.steps()}
        last = await second_run.load("count_on_3")
    assert first.status is RunStatus.COMPLETED and second.status is RunStatus.COMPLETED
    assert set(statuses.values()) == {StepStatus.CACHED}, statuses
    assert last == 10


@step
def paced_link(x: int, pause_s: float = 0.0) -> int:
    time.sleep(pause_s)
    return x + 1


@pipeline
def six_paced_links(pause_s: float) -> None:
    value = paced_link(x=0)
    value = paced_link(value, pause_s=pause_s)
    for _ in range(4):
        value = paced_link(value)


def published(
    cv: Conveyor, monkeypatch: pytest.MonkeyPatch, what: Callable[[Event], T | None]
) -> list[T]:
    """What ``what`` makes of each event the embedded broker is asked to publish from now
    on, in order (those it makes nothing of left out)."""
    found: list[T] = []
    publish = cv.broker.publish

    async def recording(events: Sequence[Event]) -> None:
        found.extend(made for made in map(what, events) if made is not None)
        await publish(events)

    monkeypatch.setattr(cv.broker, "publish", recording)
    return found


def forwarded_steps(cv: Conveyor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The steps whose StepReady a worker forwards through the broker, as it publishes."""

    def forwarded(event: Event) -> str | None:
        return event.step.name if isinstance(event, StepReady) and event.rode_on else None

    return published(cv, monkeypatch, forwarded)


async def test_a_chain_of_quick_steps_runs_in_place_without_a_hop_a_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The five after the first ride on its StepReady; each runs on the worker that ran the
    # one before, once that one's outcome is confirmed: none goes through the broker.
    async with Conveyor() as cv:
        forwarded = forwarded_steps(cv, monkeypatch)
        run = await cv.submit(six_paced_links, pause_s=0.0, cache=False)
        record = await run.wait(timeout=60)
        steps = await run.steps()
        last = await run.load("paced_link_6")
    assert record.status is RunStatus.COMPLETED
    assert {(s.status, s.attempt) for s in steps} == {(StepStatus.COMPLETED, 1)}
    assert last == 6
    assert forwarded == []


async def test_the_rider_after_a_long_step_goes_through_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # paced_link_2 takes longer than a delivery's steps may take for the next to run in
    # place: a worker that died later would make another run all of them again. Its rider
    # is forwarded, and the rest run in place on that rider's delivery.
    monkeypatch.setattr(runtime, "IN_PLACE_S", 0.2)
    async with Conveyor() as cv:
        forwarded = forwarded_steps(cv, monkeypatch)
        run = await cv.submit(six_paced_links, pause_s=0.3, cache=False)
        record = await run.wait(timeout=60)
        last = await run.load("paced_link_6")
    assert record.status is RunStatus.COMPLETED
    assert last == 6
    assert forwarded == ["paced_link_3"]


def outcomes_or_start(event: Event) -> list[str] | None:
    """The steps whose outcomes ``event`` carries (a StepsDone, several), or ``started
    NAME`` for a StepStarted."""
    if isinstance(event, StepsDone):
        return [o.step for o in event.outcomes]
    if isinstance(event, StepSucceeded | StepFailed):
        return [event.step]
    return [f"started {event.step}"] if isinstance(event, StepStarted) else None


async def test_the_outcomes_of_a_quick_chain_reach_the_controller_in_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Six quick links, the five after the first riding in place: one message carries
    # their six outcomes, in the order they ran, where each had one of its own.
    async with Conveyor() as cv:
        heard = published(cv, monkeypatch, outcomes_or_start)
        run = await cv.submit(six_paced_links, pause_s=0.0, cache=False)
        record = await run.wait(timeout=60)
        steps = await run.steps()
    assert record.status is RunStatus.COMPLETED
    assert {(s.status, s.attempt) for s in steps} == {(StepStatus.COMPLETED, 1)}
    assert heard == [[f"paced_link_{i}" if i > 1 else "paced_link" for i in range(1, 7)]]


async def test_a_long_step_is_announced_after_the_outcomes_of_the_steps_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # paced_link_2 runs long enough to be announced (StepStarted) while the outcome of
    # paced_link, run before it in place, is held to go out with the next ones. Heard
    # first, the StepStarted would be early for the controller (its parent's outcome not
    # recorded) and dropped: the step would show pending while it runs, with no lease.
    monkeypatch.setattr(outcomes, "HELD_S", 5.0)
    async with Conveyor() as cv:
        heard = published(cv, monkeypatch, outcomes_or_start)
        run = await cv.submit(six_paced_links, pause_s=0.3, cache=False)
        record = await run.wait(timeout=60)
    assert record.status is RunStatus.COMPLETED
    assert heard[:2] == [["paced_link"], ["started paced_link_2"]], heard
    later = [f"paced_link_{i}" for i in range(2, 7)]
    assert [name for message in heard[2:] for name in message] == later, heard


@step
def trusted_link() -> int:
    return 1


@step
def refused_link(x: int) -> int:
    return x + 1


@pipeline
def trusted_then_refused() -> None:
    refused_link(trusted_link())


async def test_a_rider_refused_in_place_is_dead_lettered_as_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This worker will not run refused_link (as a worker that does not trust its package
    # would not). Its own StepReady goes on, for a worker that may trust it; refused again,
    # it is what the dead letters hold, with the reason, not trusted_link's StepReady it
    # rode on (trusted_link ran, and a replay of that one would run it again for nothing).
    resolved = StepResolver.resolved

    def refusing(self: StepResolver, spec: StepSpec) -> StepDefinition | None:
        if spec.name == "refused_link":
            raise UntrustedStep("refused_link is not trusted here")
        return resolved(self, spec)

    monkeypatch.setattr(StepResolver, "resolved", refusing)
    async with Conveyor() as cv:
        run = await cv.submit(trusted_then_refused, cache=False)
        record = await run.wait(timeout=60)
        steps = {s.name: s for s in await run.steps()}
        dead = [(d.event, d.reason) for d in cv.broker.dead_letters]
    assert record.status is RunStatus.FAILED
    assert steps["trusted_link"].status is StepStatus.COMPLETED
    assert steps["refused_link"].status is StepStatus.FAILED
    assert "refused_link is not trusted here" in (steps["refused_link"].error or "")
    [(event, reason)] = dead
    assert isinstance(event, StepReady) and event.step.name == "refused_link", event
    assert "not trusted here" in reason
