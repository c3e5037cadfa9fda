"""The controller's holding of a chain rider's early outcomes, the controller itself (not
started: its batches are called directly), on the embedded stack's store, with a broker of
its own that nothing consumes. Deliveries are fakes that remember how they were settled."""

from __future__ import annotations

import pytest

from conveyor.contracts import RunRequested, StepStarted, new_id
from conveyor.service import batch_failures
from conveyor.service.store.db import MetadataStoreError
from tests.integration.controller_support import Fake, controller, drain, started
from tests.unit.test_scheduling import BY, ok


async def test_a_held_delivery_of_a_batch_that_fails_is_settled_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch: s1's StepStarted (early: held), then a RunRequested whose idempotency key
    # the store cannot look up ("database is locked"). The batch raises before the held
    # delivery is taken out of it, so the failed batch still holds it: taken apart, it is
    # processed (and held) again; had the batch been handed back, it would be requeued
    # while held. Once s0's outcome is recorded, each copy held is released and acked: a
    # delivery settled twice (on RabbitMQ, an unknown delivery tag closes the channel).
    monkeypatch.setattr(batch_failures, "BACK_OFF_S", 0.01)
    async with controller() as c:
        run_id = await started(c)
        held = Fake(StepStarted(run_id=run_id, step="s1", attempt=1, by=BY))
        request = RunRequested(run_id=new_id(), pipeline="p", idempotency_key="k")
        other = Fake(request)

        async def locked(key: str) -> None:
            raise MetadataStoreError("database is locked")

        monkeypatch.setattr(c._runs, "find_by_key", locked)
        batch = [held, other]
        try:
            await c._process(batch)  # type: ignore[arg-type]
        except Exception as exc:
            await c._failures.failed(batch, exc)  # type: ignore[arg-type]
        state = await c._state_of(run_id)
        assert state is not None
        await c._process([Fake(ok(state, "s0"))])  # type: ignore[list-item]
        await drain(c)
    assert held.settled == ["ack"]
