"""What the embedded controller does with the requests it is delivered: at least once, with
their cancellation in the same batch, and beside a message that cannot be handled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.contracts import (
    Delivery,
    OutputSelector,
    PipelineSpec,
    RunCancelRequested,
    RunRequested,
    StepSpec,
    new_id,
    utcnow,
)
from conveyor.service.controller import Controller
from conveyor.service.run_timers import RunTimers
from conveyor.workers.broker_inprocess import InProcessBroker


@step
def produce() -> dict[str, list[int]]:
    return {"numbers": [1, 2, 3]}


@step
def consume(data: dict[str, list[int]]) -> int:
    return sum(data["numbers"])


@pipeline
def handoff() -> None:
    consume(produce())


async def test_a_run_requested_and_cancelled_in_one_batch_never_starts() -> None:
    """A client that gave up before any controller took its request (Ctrl+C on a stack
    whose controller was down): the controller that comes later runs nothing of it."""
    async with Conveyor() as cv:
        spec, _ = handoff.compile()
        request = RunRequested(run_id=new_id(), pipeline="handoff", spec=spec)
        cancel = RunCancelRequested(run_id=request.run_id, reason="interrupted")
        await cv.broker.publish([request, cancel])  # both reach the controller in one batch
        for _ in range(200):
            runs = await cv.services.runs.list_runs()
            if runs and runs[0].status is RunStatus.CANCELLED:
                break
            await asyncio.sleep(0.05)
        assert [(r.id, r.status, r.error) for r in runs] == [
            (request.run_id, RunStatus.CANCELLED, "interrupted")
        ]
        steps = await cv.services.runs.steps_of(request.run_id)
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        ("produce", StepStatus.CANCELLED, 0),
        ("consume", StepStatus.CANCELLED, 0),
    ], "attempt 0: never dispatched"


async def test_a_request_a_controller_records_is_queued_no_longer() -> None:
    """The client kept its request (in the store it shares with the controller); the
    controller that records the run drops the request in the same transaction."""
    async with Conveyor() as cv:
        assert cv.stack is not None
        spec, _ = handoff.compile()
        request = RunRequested(run_id=new_id(), pipeline="handoff", spec=spec)
        requests = cv.services.run_requests
        await requests.record(request.run_id, spec, cv.stack, None, utcnow())
        assert await requests.is_requested(request.run_id)
        await cv.broker.publish([request])
        for _ in range(200):
            if await cv.services.runs.recorded([request.run_id]):
                break
            await asyncio.sleep(0.05)
        assert not await requests.is_requested(request.run_id), "taken with its recording"
        for _ in range(200):
            if (await cv.services.runs.get_run(request.run_id)).status is RunStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)


async def test_a_request_withdrawn_on_record_never_starts_however_late_its_cancellation() -> None:
    """The client withdrew the request (on record, in the store it shares with the
    controller) before any controller took it; its cancellation message is late or lost:
    the controller that takes the request still runs nothing of it."""
    async with Conveyor() as cv:
        assert cv.stack is not None
        spec, _ = handoff.compile()
        request = RunRequested(run_id=new_id(), pipeline="handoff", spec=spec)
        runs, requests = cv.services.runs, cv.services.run_requests
        await requests.record(request.run_id, spec, cv.stack, None, utcnow())
        await requests.withdraw(request.run_id, "interrupted (Ctrl+C)", utcnow())
        assert await runs.list_runs() == [], "withdrawn: no longer shown queued"
        await cv.broker.publish([request])  # no RunCancelRequested behind it
        for _ in range(200):
            listed = await runs.list_runs()
            if listed and listed[0].status is RunStatus.CANCELLED:
                break
            await asyncio.sleep(0.05)
        assert [(r.id, r.status, r.error) for r in listed] == [
            (request.run_id, RunStatus.CANCELLED, "interrupted (Ctrl+C)")
        ]
        steps = await runs.steps_of(request.run_id)
        assert await requests.withdrawn([request.run_id]) == {}, "dropped once recorded"
        # A run a controller recorded already is not withdrawn on record: its cancellation
        # message stops it.
        started = await cv.submit_compiled(*handoff.compile())
        await started.wait(timeout=60)
        await requests.withdraw(started.id, "too late", utcnow())
        assert await requests.withdrawn([started.id]) == {}
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        ("produce", StepStatus.CANCELLED, 0),
        ("consume", StepStatus.CANCELLED, 0),
    ], "attempt 0: never dispatched"


async def test_a_request_delivered_again_for_a_recorded_run_starts_nothing() -> None:
    """Requests are delivered at least once: one for a run the store holds (alone in its
    batch, or twice in one) is dropped, whatever the run has become meanwhile."""
    async with Conveyor() as cv:
        spec, definitions = handoff.compile()
        run = await cv.submit_compiled(spec, definitions)
        first = await run.wait(timeout=60)
        again = RunRequested(run_id=run.id, pipeline="handoff", spec=spec)
        await cv.broker.publish([again, again.model_copy(update={"event_id": new_id()})])
        fresh = RunRequested(run_id=new_id(), pipeline="handoff", spec=spec)
        await cv.broker.publish([fresh])  # after the repeats, in their batch or the next
        for _ in range(200):
            runs = {r.id: r.status for r in await cv.services.runs.list_runs()}
            if runs.get(fresh.run_id) is RunStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)
        assert runs == {run.id: RunStatus.COMPLETED, fresh.run_id: RunStatus.COMPLETED}
        assert await cv.services.runs.run_by_id(run.id) == first
        assert not cv.broker.dead_letters, "dropped, not taken for poison"  # type: ignore[attr-defined]
        steps = await cv.services.runs.steps_of(run.id)
    assert [(s.name, s.status, s.attempt) for s in steps] == [
        ("produce", StepStatus.COMPLETED, 1),
        ("consume", StepStatus.COMPLETED, 1),
    ]


async def test_a_message_that_fails_its_batch_is_dead_lettered_and_the_rest_proceed() -> None:
    """A spec whose step reads an output of a step that does not exist used to fail the
    controller's whole batch, requeued for ever. The contract refuses such a spec now; this
    one is built past its checks, standing for any message that fails the controller."""
    async with Conveyor() as cv:
        good, _ = handoff.compile()
        dangling = StepSpec(
            name="orphan",
            ref=good.steps[0].ref,
            inputs={"x": OutputSelector(step="ghost", output="o")},
        )
        broken = PipelineSpec.model_construct(
            name="broken", ref=None, parameters={}, steps=[dangling]
        )
        poison = RunRequested.model_construct(run_id=new_id(), pipeline="broken", spec=broken)
        fine = [RunRequested(run_id=new_id(), pipeline="handoff", spec=good) for _ in range(2)]
        await cv.broker.publish([fine[0], poison, fine[1]])  # one batch
        for _ in range(200):
            runs = await cv.services.runs.list_runs()
            if len(runs) == 2 and all(r.status is RunStatus.COMPLETED for r in runs):
                break
            await asyncio.sleep(0.05)
        assert sorted(r.id for r in runs) == sorted(r.run_id for r in fine)
        assert {r.status for r in runs} == {RunStatus.COMPLETED}
        broker = cv.broker
        assert isinstance(broker, InProcessBroker)
        [letter] = broker.dead_letters
        assert letter.event.run_id == poison.run_id
        assert "cannot process" in letter.reason and "ghost" in letter.reason


async def test_a_lease_check_failing_after_a_batch_does_not_process_the_batch_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch recorded and acked is done: a lease check that fails after it (the store
    hiccups) backs off, instead of taking the batch apart and applying each event again."""
    processed: list[str] = []
    process, check = Controller._process, RunTimers.check_leases
    failures = [RuntimeError("the store hiccuped")]

    async def counting(self: Controller, deliveries: list[Delivery], *queued: Any) -> None:
        processed.extend(d.event.event_id for d in deliveries)
        await process(self, deliveries, *queued)

    async def failing_once(self: RunTimers) -> None:
        if processed and failures:
            raise failures.pop()
        await check(self)

    monkeypatch.setattr(Controller, "_process", counting)
    monkeypatch.setattr(RunTimers, "check_leases", failing_once)
    async with Conveyor() as cv:
        record = await (await cv.submit(handoff, cache=False)).wait(timeout=30)
    assert record.status is RunStatus.COMPLETED
    assert not failures, "the lease check failed once, after a batch"
    assert len(processed) == len(set(processed)), "an acked delivery was processed again"
