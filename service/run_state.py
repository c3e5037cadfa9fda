"""A run as the controller holds it in memory: each step's state and the counters kept
with them (steps waiting for their inputs, unfinished, dispatched), and what one change of
it writes and publishes (:class:`Transition`). The transitions themselves are
``scheduling``'s."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from conveyor.contracts import (
    FINISHED_STEP_STATUSES,
    ArtifactRef,
    ConveyorError,
    RunStatus,
    StepStatus,
)

# For typing only: the store imports this module, and listing its records (the CLI) needs
# neither the pipeline spec's models nor the events'.
if TYPE_CHECKING:
    from conveyor.contracts import Event, PipelineSpec, StepSpec

MAX_DISPATCHED = 1_000
"""The most steps of one run dispatched and not finished at once. The run's other ready
steps wait (stored pending, attempt 0) and are dispatched as those finish, so that a
fan-out of 100,000 holds a thousand StepReady events, outbox rows and queued messages at a
time, not all of them; it also leaves room in the queues for other runs' steps."""


NO_OUTPUTS: Mapping[str, ArtifactRef] = MappingProxyType({})
"""The outputs of a step that has none yet: one shared, read-only mapping, not a dict per
step (a fan-out of 100,000 steps would hold as many)."""


@dataclass(slots=True)
class StepState:
    """What the controller knows of one step; ``attempt`` 0 means not dispatched yet.

    A running attempt holds a lease until ``lease_until``, renewed by its worker's
    heartbeats. The lease lives in memory only: a controller that starts grants every
    running attempt a fresh lease. ``lost`` counts the attempts whose lease lapsed; it is
    stored with the step (as ``redone`` is), so that a controller that reloads its states
    still charges neither to the step's retries. A pending attempt with a ``retry_at``
    waits for that time to be dispatched (it is stored with the step).
    """

    spec: StepSpec
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    outputs: Mapping[str, ArtifactRef] = field(default_factory=lambda: NO_OUTPUTS)
    lease_until: datetime | None = None
    lost: int = 0
    worker: str | None = None
    retry_at: datetime | None = None
    cache_key: str | None = None
    redone: int = 0
    """Attempts of a step that rode whose outcome was not taken, since they read another
    execution's outputs than those recorded (stored with the step, as ``lost``)."""
    decided: bool = False
    """Whether the controller found nothing to reuse for it (memory only: a reloaded step
    is decided again)."""


SUCCEEDED = frozenset({StepStatus.COMPLETED, StepStatus.CACHED})
"""The statuses of a step whose outputs exist: downstream steps may run."""


@dataclass
class RunState:
    """What the controller knows of one run.

    ``waiting`` (upstream steps not yet completed, per step) and ``unfinished`` are kept as
    counters so that each event costs the same whatever the size of the DAG. ``ready``
    holds the steps whose inputs exist but that wait for room under ``max_dispatched``
    (``dispatched`` counts the steps with an attempt out and not finished).
    """

    run_id: str
    status: RunStatus
    steps: dict[str, StepState]
    downstream: dict[str, list[str]]
    error: str | None = None
    waiting: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0
    defer: bool = False
    """Steps whose inputs exist wait in ``Transition.ready`` for the controller's decision."""
    retry_of: str | None = None
    """The run this one retries."""
    previous: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    """What a retry may reuse: the steps of ``retry_of`` that completed or were cached, by
    name, with their cache key and the run that computed their outputs."""
    ready: deque[str] = field(default_factory=deque)
    dispatched: int = 0
    max_dispatched: int = MAX_DISPATCHED

    @classmethod
    def new(cls, run_id: str, spec: PipelineSpec) -> RunState:
        """A pending run of ``spec`` with every step pending."""
        steps = {s.name: StepState(s) for s in spec.steps}
        # Only steps that have some: the leaves of a fan-out of 100,000 need no list each.
        downstream: dict[str, list[str]] = {}
        # What ``recount`` derives, for steps all pending: ``upstream`` is computed once
        # (it is a fifth of recording a run of ten steps).
        waiting: dict[str, int] = {}
        for s in spec.steps:
            upstream = s.upstream
            waiting[s.name] = len(upstream)
            for up in upstream:
                if up not in steps:  # the contract refuses such a spec; one built past it
                    raise ConveyorError(f"step {s.name!r} reads an output of unknown {up!r}")
                downstream.setdefault(up, []).append(s.name)
        run = cls(run_id=run_id, status=RunStatus.PENDING, steps=steps, downstream=downstream)
        run.unfinished = len(steps)
        run.waiting = waiting
        run.ready = deque(name for name, count in waiting.items() if count == 0)
        return run

    def recount(self) -> None:
        """Derive the counters from the steps' statuses (after loading them from the store)."""
        self.unfinished = sum(s.status not in FINISHED_STEP_STATUSES for s in self.steps.values())
        self.waiting = {
            name: sum(self.steps[up].status not in SUCCEEDED for up in s.spec.upstream)
            for name, s in self.steps.items()
        }
        self.dispatched = sum(
            s.attempt > 0 and s.status not in FINISHED_STEP_STATUSES for s in self.steps.values()
        )
        self.ready = deque(name for name in self.steps if is_ready(self, name))

    def set_status(self, name: str, status: StepStatus) -> None:
        """Change a step's status, keeping the counters true."""
        state = self.steps[name]
        was_finished = state.status in FINISHED_STEP_STATUSES
        now_finished = status in FINISHED_STEP_STATUSES
        self.unfinished += int(was_finished) - int(now_finished)
        if state.attempt > 0:  # an attempt was out: its room goes to a ready step
            self.dispatched += int(was_finished) - int(now_finished)
        if status in SUCCEEDED and state.status not in SUCCEEDED:
            for child in self.downstream.get(name, ()):
                self.waiting[child] -= 1
        state.status = status


@dataclass
class StepUpdate:
    """A new row state for one step (None: leave the stored value as it is)."""

    name: str
    status: StepStatus
    attempt: int
    started: datetime | None = None
    finished: datetime | None = None
    duration_s: float | None = None
    error: str | None = None
    traceback: str | None = None
    pid: int | None = None
    worker: str | None = None
    outputs: dict[str, ArtifactRef] = field(default_factory=dict)
    logs: ArtifactRef | None = None
    retry_at: datetime | None = None
    """When a pending attempt is due; None clears it."""
    cache_key: str | None = None
    cached_from: str | None = None
    lost: int | None = None
    """The step's ``StepState.lost``, when it changed."""
    redone: int | None = None
    """The step's ``StepState.redone``, when it changed."""


@dataclass
class Transition:
    """What one call changed: step rows, the run's status, and events to publish."""

    steps: list[StepUpdate] = field(default_factory=list)
    run_status: RunStatus | None = None
    run_error: str | None = None
    emit: list[Event] = field(default_factory=list)
    ready: list[str] = field(default_factory=list)
    """Steps of a deferring run whose inputs exist, for the controller to decide about."""

    def extend(self, other: Transition) -> None:
        """Fold ``other`` (a later change of the same run) into this one."""
        self.steps.extend(other.steps)
        self.emit.extend(other.emit)
        self.ready.extend(other.ready)
        if other.run_status is not None:
            self.run_status, self.run_error = other.run_status, other.run_error


def is_ready(run: RunState, name: str) -> bool:
    """Whether ``name``'s inputs exist and it was not dispatched yet (nor finished)."""
    state = run.steps[name]
    return state.attempt == 0 and state.status is StepStatus.PENDING and run.waiting[name] == 0
