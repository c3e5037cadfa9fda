"""The RabbitMQ broker under a controller and a worker pool in this process.

Duplicates, poison messages, unroutable publishes, unimportable steps and worker pools,
against the real broker (a fresh vhost per test).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from structlog.testing import capture_logs

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ConveyorError,
    Delivery,
    Event,
    PipelineSpec,
    RunFinished,
    RunRecord,
    RunRequested,
    RunStatus,
    StackSpec,
    StepReady,
    StepSpec,
    StepStatus,
    StepSucceeded,
    WorkerFacts,
    new_id,
)
from conveyor.contracts.events import Rider, forwarded
from conveyor.contracts.pipeline_spec import OutputSelector
from conveyor.service.context import Services
from conveyor.service.controller import Controller
from conveyor.service.engine import Conveyor
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.flavors import make_artifact_store, make_broker
from conveyor.workers.rabbitmq_topology import QUEUE_HEADER, REASON_HEADER
from conveyor.workers.runtime import WorkerPool
from tests.integration.rabbitmq_support import (
    markers,
    register_stack,
    release,
    starts,
    vhost,
)
from tests.pipelines import rabbitmq_pipelines as pipelines
from tests.unit.test_scheduling import ref

__all__ = ["markers", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


class RecordingBroker(RabbitMQBroker):
    """A RabbitMQBroker that keeps what it published."""

    def __init__(self, broker: RabbitMQBroker) -> None:
        super().__init__(broker.topology, broker.config, name=broker.name)
        self.published: list[Event] = []

    async def publish(self, events: Sequence[Event]) -> None:
        await super().publish(events)
        self.published.extend(events)


@dataclass
class Rig:
    url: str
    stack: StackSpec
    services: Services
    controller_broker: RabbitMQBroker
    controller: Controller
    worker_broker: RecordingBroker
    workers: list[WorkerPool] = field(default_factory=list)

    async def add_workers(
        self, *, pools: Sequence[str] = ("default",), name: str, step_timeout: float | None = None
    ) -> WorkerPool:
        pool = WorkerPool(
            self.worker_broker,
            make_artifact_store(self.stack),
            pools=pools,
            concurrency=2,
            name=name,
            step_timeout=step_timeout,
        )
        self.workers.append(pool)
        await pool.start()
        return pool

    async def finished(self, run_id: str, timeout: float = 60) -> RunRecord:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                record = await self.services.runs.get_run(run_id)
            except ConveyorError:
                record = None
            if record is not None and record.status in FINISHED_RUN_STATUSES:
                return record
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"run {run_id} did not finish in {timeout}s: {record}")
            await asyncio.sleep(0.05)

    async def raw_publish(self, queue: str, body: bytes, **properties: Any) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(
                aio_pika.Message(body, **properties), routing_key=queue
            )

    async def dead_letters(self) -> list[AbstractIncomingMessage]:
        """Take every message out of the stack's dead-letter queue."""
        queue = self.controller_broker.topology.dead_letter_queue
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(queue, passive=True)
            letters = []
            while (message := await dead.get(fail=False)) is not None:
                letters.append(message)
                await message.ack()
        return letters

    async def queue_depth(self, queue: str) -> int:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            assert count is not None
            return count


async def eventually(check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if check():
            return
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def rig(vhost: str, tmp_path: Path) -> AsyncIterator[Rig]:
    stack = await register_stack(vhost, tmp_path / "artifacts")
    services = await Services.open()
    made = make_broker(stack)
    assert isinstance(made, RabbitMQBroker)
    controller_broker = made
    worker_broker = RecordingBroker(made)
    controller = Controller(services.db, controller_broker, stack, owner=None)
    rig = Rig(vhost, stack, services, controller_broker, controller, worker_broker)
    try:
        await controller_broker.start()
        await worker_broker.start()
        await controller.start()
        yield rig
    finally:
        for pool in rig.workers:
            await pool.stop(grace=0)
        await controller.stop()
        await worker_broker.stop()
        await controller_broker.stop()
        await services.close()


async def test_duplicated_completions_change_nothing_and_poison_goes_to_the_dead_letters(
    rig: Rig, markers: Path
) -> None:
    topology = rig.controller_broker.topology
    await rig.add_workers(name="w")
    async with Conveyor(stack=rig.stack.name) as cv:
        run = await cv.submit(pipelines.gated_chain)
        await eventually(lambda: any(name == "gate" for name, _ in starts(markers)))
        [seed_done] = [
            e
            for e in rig.worker_broker.published
            if isinstance(e, StepSucceeded) and e.step == "seed"
        ]
        before = {s.name: s for s in await rig.services.runs.steps_of(run.id)}

        poison = {
            "not json": b"{this is not json",
            "unknown type": json.dumps({"type": "StepExploded", "run_id": run.id}).encode(),
            "unknown version": seed_done.model_copy()
            .model_dump_json()
            .replace('"schema_version":1', '"schema_version":7')
            .encode(),
            "missing field": json.dumps({"type": "StepReady", "run_id": run.id}).encode(),
        }
        queues = [topology.runs_queue, topology.events_queue, topology.step_queue("default")]
        with capture_logs() as logs:
            for _ in range(2):
                await rig.raw_publish(
                    topology.events_queue,
                    seed_done.model_dump_json().encode(),
                    message_id=seed_done.event_id,
                )
            for queue in queues:
                for what, body in poison.items():
                    await rig.raw_publish(queue, body, message_id=f"poison-{what}-{queue}")
            expected = len(queues) * len(poison)
            for _ in range(600):
                if await rig.queue_depth(topology.dead_letter_queue) >= expected:
                    break
                await asyncio.sleep(0.05)

        # The run goes on: the consumers survived, and the duplicates dispatched nothing.
        release(markers, "gate")
        record = await run.wait(timeout=60)
        assert record.status is RunStatus.COMPLETED
        after = {s.name: s for s in await rig.services.runs.steps_of(run.id)}
    assert after["seed"] == before["seed"]
    assert [name for name, _ in starts(markers)] == ["seed", "gate", "last"]
    artifacts = await rig.services.artifacts.list_artifacts()
    assert sorted(a.step_name for a in artifacts) == ["gated", "plus", "seed"]

    letters = await rig.dead_letters()
    found = {
        (m.headers[QUEUE_HEADER], m.message_id): str(m.headers[REASON_HEADER]) for m in letters
    }
    assert len(letters) == len(found) == len(queues) * len(poison)
    for queue in queues:
        for what in poison:
            reason = found[(queue, f"poison-{what}-{queue}")]
            assert reason.startswith("invalid event"), reason
    events = topology.events_queue
    assert "schema_version" in found[(events, f"poison-unknown version-{events}")]
    dead_logs = [entry for entry in logs if entry["event"] == "dead-lettered"]
    assert {entry["message_id"] for entry in dead_logs} >= {m.message_id for m in letters}
    assert not any("this is not json" in json.dumps(entry, default=str) for entry in logs)


async def test_a_step_that_cannot_be_imported_fails_naming_its_reference(
    rig: Rig, markers: Path
) -> None:
    pool = await rig.add_workers(name="w")
    ref = "tests/pipelines/not_there.py:ghost"
    spec = PipelineSpec(name="ghostly", steps=[StepSpec(name="ghost", ref=ref, outputs=["output"])])
    request = RunRequested(run_id=new_id(), pipeline="ghostly", spec=spec)
    await rig.worker_broker.publish([request])
    record = await rig.finished(request.run_id)
    assert record.status is RunStatus.FAILED
    [ghost] = await rig.services.runs.steps_of(request.run_id)
    assert ghost.status is StepStatus.FAILED
    assert ghost.error is not None and ref in ghost.error
    # The worker is still there and runs the next run.
    assert pool.consumer_count == 1
    async with Conveyor(stack=rig.stack.name) as cv:
        run = await cv.submit(pipelines.small, value=5)
        assert (await run.wait(timeout=60)).status is RunStatus.COMPLETED
        assert await run.load("plus") == 105


async def test_a_step_of_a_pool_runs_on_a_worker_of_that_pool(rig: Rig, markers: Path) -> None:
    await rig.add_workers(name="cpu")
    await rig.add_workers(name="gpu", pools=["gpu"])
    async with Conveyor(stack=rig.stack.name) as cv:
        run = await cv.submit(pipelines.pooled)
        assert (await run.wait(timeout=60)).status is RunStatus.COMPLETED
        steps = {s.name: s for s in await run.steps()}
    assert steps["seed"].worker == "cpu" and steps["on_gpu"].worker == "gpu"
    assert await rig.queue_depth(rig.controller_broker.topology.step_queue("gpu")) == 0


async def test_an_unroutable_publish_is_an_error_not_a_silent_loss(rig: Rig) -> None:
    topology = rig.controller_broker.topology
    connection = await aio_pika.connect(rig.url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(topology.events_queue)
    done = StepSucceeded(
        run_id=new_id(), step="s", attempt=1, duration_s=0.0, by=WorkerFacts(worker="w", pid=1)
    )
    with pytest.raises(ConveyorError, match="could not route"):
        await rig.worker_broker.publish([done])


async def test_the_worker_step_timeout_caps_a_step_without_its_own(rig: Rig, markers: Path) -> None:
    await rig.add_workers(name="w", step_timeout=0.5)
    async with Conveyor(stack=rig.stack.name) as cv:
        run = await cv.submit(pipelines.overlong)
        record = await run.wait(timeout=60)
    steps = {s.name: s for s in await rig.services.runs.steps_of(run.id)}
    assert record.status is RunStatus.FAILED
    assert steps["seed"].status is StepStatus.COMPLETED
    assert steps["slow"].status is StepStatus.FAILED
    assert steps["slow"].error == "TimeoutError: step timed out after 0.5s"


async def test_a_run_id_of_60000_characters_is_dead_lettered_and_the_stack_moves_on(
    rig: Rig, markers: Path
) -> None:
    """It used to fail the controller's whole batch (a LIKE pattern SQLite refuses), which
    was requeued for ever: no run on the stack moved again."""
    topology = rig.controller_broker.topology
    await rig.add_workers(name="w")
    async with Conveyor(stack=rig.stack.name) as cv:
        run = await cv.submit(pipelines.gated_chain)
        await eventually(lambda: any(name == "gate" for name, _ in starts(markers)))
        cancels = {
            "huge": {"type": "RunCancelRequested", "run_id": "x" * 60_000},
            "percent": {"type": "RunCancelRequested", "run_id": "%"},
            "underscore": {"type": "RunCancelRequested", "run_id": "_" * 32},
            "prefix": {"type": "RunCancelRequested", "run_id": run.id[:4]},
        }
        for what, body in cancels.items():
            await rig.raw_publish(
                topology.runs_queue, json.dumps(body).encode(), message_id=f"cancel-{what}"
            )
        for _ in range(200):
            if await rig.queue_depth(topology.dead_letter_queue) >= 1:
                break
            await asyncio.sleep(0.05)
        release(markers, "gate")
        # The run goes on, and no wildcard or prefix cancelled it.
        record = await run.wait(timeout=60)
        assert record.status is RunStatus.COMPLETED

    letters = await rig.dead_letters()
    assert [m.message_id for m in letters] == ["cancel-huge"]
    assert "run_id" in str(letters[0].headers[REASON_HEADER])


async def test_followers_in_one_process_hear_their_own_runs_through_one_queue(rig: Rig) -> None:
    """Every run a process follows is a binding of one queue: a second follower of a run
    keeps hearing it when the first stops, and a run followed again at once is not undone
    by the unbinding of its previous follower."""
    broker = rig.worker_broker
    heard: dict[str, list[str]] = {}

    def hear(name: str) -> Callable[[Event], Any]:
        heard[name] = []

        async def on(event: Event) -> None:
            heard[name].append(event.event_id)

        return on

    async def finish(run_id: str) -> str:
        event = RunFinished(run_id=run_id, status=RunStatus.COMPLETED)
        await rig.controller_broker.publish([event])
        return event.event_id

    run_a, run_b = new_id(), new_id()
    a1 = await broker.follow(run_a, hear("a1"))
    a2 = await broker.follow(run_a, hear("a2"))
    b = await broker.follow(run_b, hear("b"))
    first_a, first_b = await finish(run_a), await finish(run_b)
    await eventually(lambda: all(heard.values()))
    assert heard == {"a1": [first_a], "a2": [first_a], "b": [first_b]}

    await a1.cancel()
    second_a = await finish(run_a)
    await eventually(lambda: len(heard["a2"]) == 2)
    assert heard["a1"] == [first_a] and heard["a2"] == [first_a, second_a]

    await a2.cancel()
    await b.cancel()
    a3 = await broker.follow(run_a, hear("a3"))
    third_a = await finish(run_a)
    await eventually(lambda: heard["a3"] == [third_a])
    await a3.cancel()
    assert heard["b"] == [first_b]


async def test_a_step_handed_back_is_handled_only_once_its_original_is_acked(
    vhost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A StepReady whose delivery ended unsettled (its worker died) is handed back as a copy
    that counts the lost delivery, then its original is acked. The copy may come back to the
    same consumer first: it is not handled before that ack has gone, or a step that kills
    its worker would have its original delivered again, counted from nothing, and run a
    fourth time (test_worker_faults.py)."""
    stack = await register_stack(vhost, tmp_path / "artifacts")
    broker = make_broker(stack)
    assert isinstance(broker, RabbitMQBroker)
    loop = asyncio.get_running_loop()
    acked: list[float] = []
    handled: list[tuple[float, int]] = []
    plain_ack = aio_pika.IncomingMessage.ack

    async def slow_ack(self: aio_pika.IncomingMessage, multiple: bool = False) -> None:
        if self.redelivered:  # the original, acked once its copy is confirmed
            await asyncio.sleep(0.5)
            await plain_ack(self, multiple)
            acked.append(loop.time())
            return
        await plain_ack(self, multiple)

    await broker.start()
    try:
        queue = broker.topology.step_queue("default")
        ready = StepReady(run_id=new_id(), step=StepSpec(name="s", ref="m.py:s"), attempt=1)
        await broker.publish([ready])
        taken = asyncio.Event()
        first = await broker.consume(queue, lambda _: taken.set(), prefetch=1)
        await taken.wait()
        await first.cancel()  # gone without settling it, as a killed worker goes

        monkeypatch.setattr(aio_pika.IncomingMessage, "ack", slow_ack)
        settled: set[asyncio.Task[None]] = set()

        def handle(delivery: Delivery) -> None:
            handled.append((loop.time(), delivery.deliveries))
            settled.add(asyncio.create_task(delivery.ack()))

        second = await broker.consume(queue, handle, prefetch=2)
        await eventually(lambda: bool(handled and acked))
        await second.cancel()
    finally:
        await broker.stop()
    [(at, deliveries)] = handled
    assert deliveries == 2, "the copy counts the delivery its first consumer left unsettled"
    assert at >= acked[0], "the copy ran while its original could still be delivered again"


async def test_a_rider_forwarded_is_handled_only_once_the_delivery_it_rode_on_is_acked(
    vhost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker forwards the StepReady of the step riding on the one it ran, then acks the
    delivery it rode on. The rider may come back to the same worker first: it is not handled
    before that ack has gone, or a rider that kills its worker would be forwarded again by
    the next worker of that delivery, its deliveries counted from nothing, and kill one
    worker more (test_worker_faults.py)."""
    stack = await register_stack(vhost, tmp_path / "artifacts")
    broker = make_broker(stack)
    assert isinstance(broker, RabbitMQBroker)
    loop = asyncio.get_running_loop()
    acked: dict[str, float] = {}
    handled: dict[str, float] = {}
    plain_ack = aio_pika.IncomingMessage.ack

    async def slow_ack(self: aio_pika.IncomingMessage, multiple: bool = False) -> None:
        await asyncio.sleep(0.5)
        await plain_ack(self, multiple)
        acked[str(self.message_id)] = loop.time()

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", slow_ack)
    first = StepSpec(name="first", ref="m.py:first", outputs=["output"])
    second = StepSpec(
        name="second",
        ref="m.py:second",
        inputs={"x": OutputSelector(step="first", output="output")},
    )
    ready = StepReady(run_id=new_id(), step=first, attempt=1, then=[Rider(step=second, attempt=1)])
    settled: set[asyncio.Task[None]] = set()

    async def run(delivery: Delivery) -> None:
        assert isinstance(delivery.event, StepReady)
        handled[delivery.event.step.name] = loop.time()
        rider = forwarded(delivery.event, {"output": ref("output")})
        if rider is not None:  # as a worker does: the rider goes out, then the ack
            await broker.publish([rider])
        await delivery.ack()

    await broker.start()
    try:
        await broker.publish([ready])
        consumer = await broker.consume(
            broker.topology.step_queue("default"),
            lambda delivery: settled.add(asyncio.create_task(run(delivery))),
            prefetch=2,
        )
        await eventually(lambda: len(acked) == 2)
        await consumer.cancel()
    finally:
        await broker.stop()
    assert handled["second"] >= acked[ready.event_id], "the rider ran before its parent's ack"
