"""Chain riders run in place, on the embedded stack: pools, cancellation, a worker that
stops, leases, a publish that fails, a delivery that comes again after its ack was lost,
and the logging context of each rider. Each test says what would make it fail."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from typing import Any

import pytest
import structlog

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import DEFAULT_POOL, Event, StepReady, StepSucceeded
from conveyor.service.controller import Controller
from conveyor.service.pipelines import PipelineDefinition
from conveyor.workers import outcomes
from conveyor.workers.broker_inprocess import InProcessBroker
from conveyor.workers.rabbitmq_errors import BrokerUnavailable
from conveyor.workers.runtime import WorkerPool
from conveyor.workers.step_resolver import StepResolver
from tests.integration.test_embedded_chain_riders import outcomes_or_start


@step
def prepare() -> int:
    return 1


@step(pool="gpu")
def train(x: int) -> int:
    return x + 1


@step
def report(x: int) -> int:
    return x + 1


@pipeline
def prepare_train_report() -> None:
    report(train(prepare()))


def another_worker(
    cv: Conveyor,
    definition: PipelineDefinition,
    name: str,
    pools: Sequence[str] = (DEFAULT_POOL,),
    concurrency: int = 4,
) -> WorkerPool:
    """A second worker of the embedded stack's broker and store, serving ``pools``, that
    runs the steps of ``definition`` (start it with ``async with``)."""
    worker = WorkerPool(
        cv.broker,
        cv.artifacts,
        resolver=StepResolver(cv.artifacts, in_process=True),
        pools=pools,
        concurrency=concurrency,
        name=name,
    )
    _, definitions = definition.compile()
    worker.resolver.add(definitions)
    return worker


async def test_a_rider_of_another_pool_runs_on_a_worker_of_its_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `train` says pool="gpu": only a worker started with `--pool gpu` may run it. With the
    # cache off it rides on `prepare` (the controller's riders ignore pools). The worker of
    # the default pool that ran `prepare` must forward its StepReady to the gpu queue; run
    # in place (as it was at first), the step ran where it must not (no GPU, other
    # packages). Here the embedded worker serves only the default pool, as a CPU worker
    # would, and a second worker serves "gpu".
    async def default_pool_only(self: WorkerPool, pools: Any) -> None:
        return None

    monkeypatch.setattr(WorkerPool, "serve", default_pool_only)
    async with Conveyor() as cv:
        gpu = another_worker(cv, prepare_train_report, "gpu-worker", pools=["gpu"])
        async with gpu:
            run = await cv.submit(prepare_train_report, cache=False)
            record = await run.wait(timeout=30)
            workers = {s.name: s.worker for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED
    assert workers["train"] == "gpu-worker", workers
    assert workers["prepare"] != "gpu-worker", workers


RIDING: dict[str, asyncio.Event] = {}


@step
def quick_parent() -> int:
    return 1


@step
async def long_rider(x: int) -> int:
    RIDING["long_rider"].set()
    await asyncio.sleep(60)
    return x + 1


@pipeline
def quick_then_long() -> None:
    long_rider(quick_parent())


async def test_a_worker_stopped_after_a_failed_publish_leaves_no_unretrieved_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The broker refuses quick_parent's StepSucceeded while long_rider runs in place, and
    # the worker is stopped (SIGTERM) before long_rider ends: its grace runs out, the
    # delivery is left unsettled for the broker to deliver again. The failed publish is
    # the pipelined one of the carrier, already done when the worker gives up on it, and
    # `Carrier.abandon` only retrieves the failure of a publish still under way: asyncio
    # logs "Task exception was never retrieved" (with a traceback) on the worker's stderr.
    RIDING["long_rider"] = asyncio.Event()
    original = InProcessBroker.publish
    refused: list[str] = []

    async def publish(self: InProcessBroker, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, StepSucceeded) and event.step == "quick_parent":
                refused.append(event.step)
                raise BrokerUnavailable("RabbitMQ did not confirm 1 message(s) within 60s")
        await original(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", publish)
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: seen.append(context))
    try:
        async with Conveyor() as cv:
            await cv.submit(quick_then_long, cache=False)
            await asyncio.wait_for(RIDING["long_rider"].wait(), timeout=30)
            await asyncio.sleep(0.1)  # the refused publish is over
            workers = cv._workers
            assert workers is not None
            await workers.stop(grace=0.2)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert refused == ["quick_parent"], "the fault was never injected"
    messages = [f"{c.get('message')}: {c.get('exception')!r}" for c in seen]
    assert not messages, messages


CANCEL_SEEN: dict[str, Any] = {}
LATER_RAN: list[str] = []


@step
async def rider_until_cancelled(x: int) -> int:
    RIDING["rider_until_cancelled"].set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        CANCEL_SEEN["rider_until_cancelled"] = True
        raise
    return x + 1


@step
def after_cancelled(x: int) -> int:
    LATER_RAN.append("after_cancelled")
    return x + 1


@pipeline
def cancelled_in_place() -> None:
    after_cancelled(rider_until_cancelled(quick_parent()))


async def test_cancelling_a_run_stops_its_rider_running_in_place() -> None:
    # rider_until_cancelled runs in place on the delivery of quick_parent. Cancelling the run stops
    # it where it runs, the delivery is acked, and the rider after it never runs. Fails if a rider
    # in place were not registered as a running execution of its run (the cancellation would not
    # reach it: the run's worker slot stays busy 60 s) or if the chain went on past a cancelled
    # rider.
    RIDING["rider_until_cancelled"] = asyncio.Event()
    CANCEL_SEEN.clear()
    LATER_RAN.clear()
    async with Conveyor() as cv:
        run = await cv.submit(cancelled_in_place, cache=False)
        await asyncio.wait_for(RIDING["rider_until_cancelled"].wait(), timeout=30)
        await cv.cancel(run.id)
        record = await run.wait(timeout=30)
        for _ in range(100):
            if CANCEL_SEEN:
                break
            await asyncio.sleep(0.05)
        workers = cv._workers
        assert workers is not None
        running = sum(len(v) for v in workers._executions.values())
    assert record.status is RunStatus.CANCELLED
    assert CANCEL_SEEN == {"rider_until_cancelled": True}
    assert running == 0
    assert LATER_RAN == []


RAN: list[str] = []


@step
async def rider_while_stopping(x: int) -> int:
    RAN.append("rider_while_stopping")
    RIDING["rider_while_stopping"].set()
    await asyncio.sleep(0.5)
    return x + 1


@step
def tail_link(x: int) -> int:
    RAN.append("tail_link")
    return x + 1


@pipeline
def stopped_mid_chain() -> None:
    tail_link(rider_while_stopping(quick_parent()))


async def test_a_worker_stopped_mid_chain_finishes_its_rider_and_forwards_the_next() -> None:
    # The worker running rider_while_stopping in place is stopped gracefully (SIGTERM). The rider
    # finishes within the grace, its outcome is confirmed, and tail_link is forwarded through the
    # broker to the other worker rather than run in place by a stopping worker. Fails if the stop
    # cancelled the rider (it would run twice), hung, lost tail_link (the run would never end), or
    # ran it in place.
    RIDING["rider_while_stopping"] = asyncio.Event()
    RAN.clear()
    async with Conveyor() as cv:
        other = another_worker(cv, stopped_mid_chain, "other-worker")
        embedded = cv._workers
        assert embedded is not None
        async with other:
            run = await cv.submit(stopped_mid_chain, cache=False)
            await asyncio.wait_for(RIDING["rider_while_stopping"].wait(), timeout=30)
            [running] = [w for w in (embedded, other) if w._executions]
            idle = other if running is embedded else embedded
            await asyncio.wait_for(running.stop(grace=10), timeout=15)
            record = await run.wait(timeout=30)
            steps = {s.name: (s.status, s.attempt, s.worker) for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED, steps
    assert RAN == ["rider_while_stopping", "tail_link"]
    assert steps["tail_link"] == (StepStatus.COMPLETED, 1, idle.facts.worker), steps


LONG_RUNS: list[str] = []


@step
async def rider_longer_than_its_lease(x: int) -> int:
    LONG_RUNS.append("rider_longer_than_its_lease")
    await asyncio.sleep(3.0)
    return x + 1


@pipeline
def quick_then_longer_than_a_lease() -> None:
    rider_longer_than_its_lease(quick_parent())


async def test_a_rider_running_in_place_longer_than_its_lease_keeps_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # rider_longer_than_its_lease runs in place for three leases (leases of 1 s, heartbeats every
    # 0.2 s). Its StepStarted may reach the controller before quick_parent's outcome (it is not
    # pipelined behind it) and then is dropped; its heartbeats renew its lease all the same, and it
    # runs once, at attempt 1. Fails if an in-place rider were not announced/heartbeaten (its lease
    # would lapse: a second attempt, run again) or if a lapsed lease did not stop the in-place
    # chain.
    monkeypatch.setitem(Controller.__init__.__kwdefaults__, "lease_s", 1.0)
    monkeypatch.setitem(WorkerPool.__init__.__kwdefaults__, "heartbeat_s", 0.2)
    LONG_RUNS.clear()
    async with Conveyor() as cv:
        run = await cv.submit(quick_then_longer_than_a_lease, cache=False)
        record = await run.wait(timeout=30)
        steps = {s.name: (s.status, s.attempt) for s in await run.steps()}
    assert record.status is RunStatus.COMPLETED, steps
    assert steps["rider_longer_than_its_lease"] == (StepStatus.COMPLETED, 1), steps
    assert LONG_RUNS == ["rider_longer_than_its_lease"]


BOUND: list[tuple[str, str, int]] = []


def _note_bound() -> None:
    bound = structlog.contextvars.get_contextvars()
    BOUND.append((bound.get("run_id"), bound.get("step"), bound.get("attempt")))


@step
def logged_first() -> int:
    _note_bound()
    return 1


@step
def logged_next(x: int) -> int:
    _note_bound()
    return x + 1


@pipeline
def logged_chain() -> None:
    logged_next(logged_next(logged_first()))


async def test_each_rider_in_place_logs_under_its_own_step() -> None:
    # The worker's log lines (and a step's own structlog lines) carry run_id/step/attempt; a rider
    # run in place on the delivery of logged_first logs as itself, not as the step whose delivery it
    # rode. Fails if the context were bound once per delivery instead of once per step.
    BOUND.clear()
    async with Conveyor() as cv:
        run = await cv.submit(logged_chain, cache=False)
        record = await run.wait(timeout=30)
    assert record.status is RunStatus.COMPLETED
    expected = [
        (run.id, "logged_first", 1),
        (run.id, "logged_next", 1),
        (run.id, "logged_next_2", 1),
    ]
    noted = list(BOUND)
    assert noted == expected


RELAYED: list[str] = []


@step(pool="intake")
def relay_head() -> int:
    RELAYED.append("relay_head")
    return 1


@step
def relay_link(x: int) -> int:
    RELAYED.append("relay_link")
    return x + 1


@pipeline
def intake_relay() -> None:
    relay_link(relay_link(relay_link(relay_head())))


async def test_a_carrier_delivered_again_after_its_ack_was_lost_runs_no_rider_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker ran relay_head and its three riders in place, every outcome confirmed; the
    # ack of the delivery was lost with its channel (a connection blip), so the broker
    # delivers relay_head's StepReady again, to the same worker (the only one of the
    # "intake" pool). It knows the outcome (`_outcomes`) and answers with the outcome
    # alone, as it did before riders ran in place. At first its answer was never marked
    # forwarded, so it handed relay_link on again, though that one ran and its outcome was
    # recorded: another worker of the default pool ran it (and the rest of the chain in
    # place) a second time, for nothing. (The in-process broker delivers a StepReady again
    # only when its consumer stops; the test publishes it again, as RabbitMQ would.)
    readies: list[StepReady] = []
    publish = InProcessBroker.publish

    async def recording(self: InProcessBroker, events: Sequence[Event]) -> None:
        readies.extend(e for e in events if isinstance(e, StepReady))
        await publish(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", recording)
    RELAYED.clear()
    async with Conveyor() as cv:
        other = another_worker(cv, intake_relay, "other-worker")
        async with other:
            run = await cv.submit(intake_relay, cache=False)
            record = await run.wait(timeout=30)
            assert record.status is RunStatus.COMPLETED
            assert RELAYED == ["relay_head"] + ["relay_link"] * 3
            [carrier] = readies
            readies.clear()
            await cv.broker.publish([carrier])  # delivered again
            await asyncio.sleep(1.0)
            steps = {s.name: (s.status, s.attempt) for s in await run.steps()}
    assert set(steps.values()) == {(StepStatus.COMPLETED, 1)}
    assert RELAYED == ["relay_head"] + ["relay_link"] * 3, RELAYED
    forwarded = [e.step.name for e in readies if e is not carrier]
    assert forwarded == [], forwarded


LINKS_RAN: list[str] = []


@step
def counted_link(x: int, name: str, pause_s: float = 0.0) -> int:
    LINKS_RAN.append(name)
    time.sleep(pause_s)
    return x + 1


@pipeline
def five_counted_links() -> None:
    value = counted_link(0, name="a")
    value = counted_link(value, name="b")
    value = counted_link(value, name="c", pause_s=3 * outcomes.HELD_S)
    for name in "de":
        value = counted_link(value, name=name)


async def test_a_chain_stops_running_in_place_once_a_publish_of_its_delivery_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The outcomes of links a and b, held while the chain's quick links run, go out while
    # link c runs (it outlasts HELD_S), and the broker refuses them. The delivery is given
    # back (on RabbitMQ, to be delivered again; the in-process broker dead-letters a
    # delivery whose handler raised): links d and e must not run on it meanwhile, work that
    # another worker would do again from a, nor be heard of without b's outcome.
    LINKS_RAN.clear()
    original = InProcessBroker.publish

    async def publish(self: InProcessBroker, events: Sequence[Event]) -> None:
        for event in events:
            if "counted_link_2" in (outcomes_or_start(event) or []):
                raise BrokerUnavailable("RabbitMQ did not confirm 1 message(s) within 60s")
        await original(self, events)

    monkeypatch.setattr(InProcessBroker, "publish", publish)
    async with Conveyor() as cv:
        await cv.submit(five_counted_links, cache=False)
        for _ in range(100):
            if cv.broker.dead_letters:
                break
            await asyncio.sleep(0.05)
        [dead] = cv.broker.dead_letters
    assert "BrokerUnavailable" in dead.reason
    assert LINKS_RAN[:3] == ["a", "b", "c"], LINKS_RAN
    assert "d" not in LINKS_RAN and "e" not in LINKS_RAN, LINKS_RAN
