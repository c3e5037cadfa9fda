"""Idempotency keys on the embedded stack: one key, one run, however the requests arrive.

The same request again is answered with the first run; another request under a used key is
refused (the HTTP API's 409), also when two race, or arrive in one batch of the controller.
"""

from __future__ import annotations

import asyncio

import pytest

from conveyor import Conveyor, RunStatus, pipeline, step
from conveyor.contracts import ConflictError, RunRequested, new_id


@step
def double(x: int) -> int:
    return x * 2


@pipeline
def doubling() -> None:
    double(21)


async def test_idempotency_key_creates_one_run() -> None:
    async with Conveyor() as cv:
        first = await cv.submit(dividing, by=2, idempotency_key="k-1")
        await first.wait(timeout=30)
        second = await cv.submit(dividing, by=2, idempotency_key="k-1")
        assert second.id == first.id
        assert len(await cv.services.runs.list_runs()) == 1


async def test_requests_that_race_for_one_idempotency_key_end_as_one_run_or_refused() -> None:
    async with Conveyor() as cv:
        same = await asyncio.gather(
            *(cv.submit(dividing, by=2, idempotency_key="race") for _ in range(2))
        )
        records = await asyncio.wait_for(asyncio.gather(*(r.wait() for r in same)), 20)
        assert {r.id for r in records} == {same[0].id} == {same[1].id}
        assert records[0].status is RunStatus.COMPLETED
        other = await asyncio.gather(
            cv.submit(dividing, by=5, idempotency_key="race-2"),
            cv.submit(dividing, by=10, idempotency_key="race-2"),
        )
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(r.wait() for r in other), return_exceptions=True), 20
        )
        refused = [o for o in outcomes if isinstance(o, ConflictError)]
        ran = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(refused) == len(ran) == 1, outcomes
        assert "'race-2' was used for run" in str(refused[0])
        assert len(await cv.services.runs.list_runs()) == 2


@step
def produce_int() -> int:
    return 10


@step
def halve(x: int, by: int) -> float:
    return x / by


@pipeline
def dividing(by: int) -> None:
    halve(produce_int(), by=by)


async def test_an_idempotency_key_reused_for_another_request_is_refused() -> None:
    async with Conveyor() as cv:
        first = await cv.submit(dividing, by=2, idempotency_key="k-2")
        assert (await first.wait(timeout=30)).parameters == {"by": 2}
        with pytest.raises(ConflictError, match=f"'k-2' was used for run {first.id}"):
            await cv.submit(dividing, by=3, idempotency_key="k-2")
        with pytest.raises(ConflictError, match="pipeline 'dividing'"):
            await cv.submit(doubling, idempotency_key="k-2")
        # The same request is still answered with the first run, and nothing new ran.
        again = await cv.submit(dividing, by=2, idempotency_key="k-2")
        assert again.id == first.id
        assert [r.id for r in await cv.services.runs.list_runs()] == [first.id]


async def test_one_key_twice_in_one_batch_creates_one_run() -> None:
    async with Conveyor() as cv:
        spec, _ = doubling.compile()
        requests = [
            RunRequested(run_id=new_id(), pipeline="doubling", spec=spec, idempotency_key="dup")
            for _ in range(2)
        ]
        await cv.broker.publish(requests)  # both reach the controller in one batch
        for _ in range(200):
            runs = await cv.services.runs.list_runs()
            if runs and runs[0].status is RunStatus.COMPLETED:
                break
            await asyncio.sleep(0.05)
        assert [(r.id, r.status) for r in runs] == [(requests[0].run_id, RunStatus.COMPLETED)]
