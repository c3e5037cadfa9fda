"""The run queue of an embedded controller (``service/run_queue.py``): which deliveries a
batch takes, with how many runs going."""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.contracts import (
    Event,
    RunCancelRequested,
    RunRequested,
    StepHeartbeat,
    WorkerFacts,
    new_id,
)
from conveyor.service.run_queue import RunQueue


@dataclass
class Taken:
    event: Event


def requests(n: int) -> list[Taken]:
    return [Taken(RunRequested(run_id=new_id(), pipeline=f"p{i}")) for i in range(n)]


def ids(deliveries: list[Taken]) -> list[str]:
    return [d.event.run_id for d in deliveries]


def test_without_a_limit_every_request_starts_at_once() -> None:
    came = requests(5)
    queue = RunQueue(None)
    batch, waiting = queue.admit(came, active=1_000)
    assert batch == came and waiting == [] and len(queue) == 0
    assert not queue.has_room(0)


def test_requests_beyond_the_limit_wait_and_start_oldest_first_as_runs_end() -> None:
    came = requests(5)
    by = WorkerFacts(worker="w", pid=1)
    beat = Taken(StepHeartbeat(run_id=came[0].event.run_id, step="s", attempt=1, by=by))
    queue = RunQueue(2)
    batch, waiting = queue.admit([*came, beat], active=0)
    assert ids(batch) == [*ids(came[:2]), beat.event.run_id]  # the others' events go on
    assert ids(waiting) == ids(came[2:]) and len(queue) == 3

    assert not queue.has_room(2)
    assert queue.admit([], active=2) == ([], [])

    later = requests(1)
    assert queue.has_room(1)
    batch, waiting = queue.admit(later, active=1)
    assert ids(batch) == ids(came[2:3]), "the request that waited longest starts first"
    assert ids(waiting) == ids(later)
    batch, _ = queue.admit([], active=0)
    assert ids(batch) == ids(came[3:5])
    assert ids(queue.take_all()) == ids(later)
    assert len(queue) == 0


def test_a_cancellation_takes_its_waiting_request_along_whatever_the_room() -> None:
    came = requests(3)
    queue = RunQueue(1)
    queue.admit(came, active=1)
    cancel = Taken(RunCancelRequested(run_id=came[1].event.run_id, reason="no"))
    batch, _ = queue.admit([cancel], active=1)
    # Both in one batch: the controller records the run cancelled, never started.
    assert [type(d.event) for d in batch] == [RunRequested, RunCancelRequested]
    assert ids(batch) == [came[1].event.run_id] * 2
    assert ids(queue.take_all()) == ids([came[0], came[2]])
