"""The controller itself, not started: its batches called directly, on the embedded
stack's store, with a broker of its own that nothing consumes. Deliveries are fakes that
remember how they were settled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from conveyor import Conveyor
from conveyor.contracts import Event, RunRequested, new_id
from conveyor.service.controller import Controller
from conveyor.service.liveness import this_process
from conveyor.workers.broker_inprocess import InProcessBroker
from tests.unit.test_chain_riders import link
from tests.unit.test_scheduling import spec


class Fake:
    """A delivery that remembers how it was settled."""

    deliveries = 1

    def __init__(self, event: Event) -> None:
        self.event = event
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def reject(self, reason: str) -> None:
        self.settled.append("reject")

    async def requeue(self) -> None:
        self.settled.append("requeue")


@asynccontextmanager
async def controller() -> AsyncIterator[Controller]:
    async with Conveyor() as cv:
        assert cv.stack is not None
        broker = InProcessBroker(cv.broker.topology)
        yield Controller(cv.services.db, broker, cv.stack, owner=this_process())


async def started(c: Controller, retries: int = 0) -> str:
    """A run s0 -> s1 with the cache off: s1 rides on s0 at attempt 1."""
    request = RunRequested(
        run_id=new_id(),
        pipeline="p",
        spec=spec(link("s0"), link("s1", "s0", retries=retries)),
        cache=False,
    )
    await c._process([Fake(request)])  # type: ignore[list-item]
    assert c._states[request.run_id].steps["s1"].attempt == 1
    return request.run_id


async def drain(c: Controller) -> None:
    """Take what the controller put back in its inbox, as its loop would."""
    while not c._inbox.empty():
        await c._process([c._inbox.get_nowait()])
