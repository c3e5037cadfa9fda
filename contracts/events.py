"""Events on the wire: an envelope (id, type, schema version, run id, time) and its payloads.

Every event is JSON. A consumer that gets bytes it cannot parse, or a schema version it does
not know, rejects the message to the dead-letter queue; see :func:`parse_event`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, TypeAdapter, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticUndefined

from conveyor.contracts.enums import RunStatus, StepStatus
from conveyor.contracts.errors import ConveyorError
from conveyor.contracts.ids import new_id, utcnow
from conveyor.contracts.limits import MAX_RETRY_DELAY_S
from conveyor.contracts.models import (
    DIGEST_PATTERN,
    MAX_NAME_LENGTH,
    ArtifactRef,
    Frozen,
    Id,
    Name,
    prevalidated,
)
from conveyor.contracts.pipeline_spec import PipelineSpec, StepSpec

SCHEMA_VERSION = 1


class Envelope(Frozen):
    """Fields every event carries."""

    event_id: Id = Field(default_factory=new_id)
    schema_version: Literal[1] = 1
    run_id: Id
    time: datetime = Field(default_factory=utcnow)


class RunRequested(Envelope):
    """Start a run of a pipeline on a stack.

    Any AMQP client may publish one; ``pipeline`` is an importable reference that the
    controller compiles unless ``spec`` carries the compiled DAG.
    """

    type: Literal["RunRequested"] = "RunRequested"
    pipeline: str = Field(min_length=1, max_length=1000)
    parameters: dict[str, Any] = Field(default_factory=dict)
    stack: Name | None = None
    spec: PipelineSpec | None = None
    idempotency_key: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    # Both left out of the JSON at their defaults: controllers from before them still take
    # a request that uses neither.
    cache: bool = Field(
        default=True,
        exclude_if=lambda value: value,
        description="False: every step runs, none is completed from an earlier run's outputs",
    )
    retry_of: Id | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="A failed or cancelled run of the same pipeline whose completed steps "
        "this run reuses (their cache keys unchanged) while it runs the others",
    )


class RunCancelRequested(Envelope):
    """Cancel a run: unfinished steps become cancelled, late completions are ignored."""

    type: Literal["RunCancelRequested"] = "RunCancelRequested"
    reason: str = Field(default="cancelled by user", max_length=1000)


Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]
RodeOn = Annotated[
    dict[Name, Digest],
    Field(
        max_length=1000,
        exclude_if=lambda value: not value,
        description="For a step that a worker forwarded (it rode on the step before it): "
        "the digests of that step's outputs it reads, by output name. The controller takes "
        "its outcome only if they are the outputs it recorded for that step.",
    ),
]


class Rider(Frozen):
    """A step the controller dispatched to follow the one before it in a chain: the worker
    that completes that one forwards it (see :func:`forwarded`)."""

    step: StepSpec
    attempt: int = Field(ge=1)


MAX_RIDERS = 16
"""The most steps of a chain that ride on one StepReady."""
MAX_SIBLINGS = 15
"""The most steps that travel with another in one StepReady (see ``StepReady.siblings``)."""


class StepReady(Envelope):
    """A step's inputs exist: a worker of ``step.pool`` may run attempt ``attempt``.

    ``then`` are the next steps of a chain, each reading only the outputs of the one before
    it, already dispatched by the controller: the worker that completes this step publishes
    the first one's StepReady, carrying the rest, with its completion (one broker hop a
    step instead of two, through the controller). Left out of the JSON when empty.
    """

    type: Literal["StepReady"] = "StepReady"
    step: StepSpec
    attempt: int = Field(ge=1)
    inputs: dict[str, ArtifactRef | list[ArtifactRef]] = Field(default_factory=dict)
    then: list[Rider] = Field(
        default_factory=list, max_length=MAX_RIDERS, exclude_if=lambda value: not value
    )
    rode_on: RodeOn = Field(default_factory=dict)
    siblings: list[StepReady] = Field(
        default_factory=list,
        max_length=MAX_SIBLINGS,
        exclude_if=lambda value: not value,
        description="Steps of the same run and pool dispatched with this one (a fan-out's "
        "branches): the worker that takes the message runs each as if it came alone, "
        "and hands back, each as a message of its own, those it cannot start soon",
    )

    @model_validator(mode="after")
    def _a_chain(self) -> StepReady:
        for sibling in self.siblings:
            if sibling.siblings or sibling.run_id != self.run_id:
                raise ValueError("a sibling is a step of the same run, with no siblings")
            if sibling.step.pool != self.step.pool:
                raise ValueError(f"sibling {sibling.step.name!r} is of another pool")
        before = self.step
        for rider in self.then:
            for binding in rider.step.inputs.values():
                for selector in binding if isinstance(binding, list) else (binding,):
                    if selector.step != before.name or selector.output not in before.outputs:
                        raise ValueError(
                            f"rider {rider.step.name!r} reads {selector.step}.{selector.output}"
                            f": a rider reads outputs of the step before it only"
                        )
            if not rider.step.inputs:
                raise ValueError(f"rider {rider.step.name!r} reads nothing of {before.name!r}")
            before = rider.step
        return self


def forwarded(ready: StepReady, outputs: Mapping[str, ArtifactRef]) -> StepReady | None:
    """The StepReady of the first step riding on ``ready``, once ``ready``'s attempt made
    ``outputs`` (all of its step's outputs); None when nothing rides on it."""
    if not ready.then:
        return None
    first = ready.then[0]
    inputs: dict[str, ArtifactRef | list[ArtifactRef]] = {}
    for name, binding in first.step.inputs.items():
        if isinstance(binding, list):
            inputs[name] = [outputs[b.output] for b in binding]
        else:
            inputs[name] = outputs[binding.output]
    # Checked parts: the riders came validated with ``ready``, the refs are the attempt's.
    return trusted(
        StepReady,
        run_id=ready.run_id,
        step=first.step,
        attempt=first.attempt,
        inputs=inputs,
        then=ready.then[1:],
        rode_on={name: ref.digest for name, ref in outputs.items()},
    )


def step_of(event: Event) -> str | None:
    """The name of the step ``event`` is about, if it is about one."""
    if isinstance(event, StepReady):
        return event.step.name
    step = getattr(event, "step", None)
    return step if isinstance(step, str) else None


def bundled(ready: Sequence[StepReady], spread: int) -> list[StepReady]:
    """``ready`` (steps of one run, in the order they were dispatched) in as few messages as
    keep at least ``spread`` of them per pool: each message a step with up to
    ``MAX_SIBLINGS`` of the same pool as its siblings. A fan-out of 100 goes out in 9
    messages instead of 100; fewer than ``2 * spread`` steps of a pool go out alone."""
    by_pool: dict[str, list[StepReady]] = {}
    for event in ready:
        by_pool.setdefault(event.step.pool, []).append(event)
    out: list[StepReady] = []
    for events in by_pool.values():
        size = min(MAX_SIBLINGS + 1, len(events) // spread)
        if size < 2:
            out.extend(events)
            continue
        for at in range(0, len(events), size):
            head, *siblings = events[at : at + size]
            # Parts this process made and checked: not validated again.
            out.append(head if not siblings else _with_siblings(head, siblings))
    return out


def _with_siblings(head: StepReady, siblings: list[StepReady]) -> StepReady:
    values = {**head.__dict__, "siblings": siblings}
    return prevalidated(StepReady, values, head.model_fields_set | {"siblings"})


def unbundled(ready: StepReady) -> list[StepReady]:
    """The steps of ``ready``: itself, without its siblings, then each sibling."""
    if not ready.siblings:
        return [ready]
    values = {**ready.__dict__, "siblings": []}
    alone = prevalidated(StepReady, values, ready.model_fields_set - {"siblings"})
    return [alone, *ready.siblings]


class WorkerFacts(Frozen):
    """Which worker process handled an attempt."""

    worker: str
    pid: int


class StepStarted(Envelope):
    """A worker began attempt ``attempt`` of ``step``."""

    type: Literal["StepStarted"] = "StepStarted"
    step: Name
    attempt: int
    by: WorkerFacts


class StepHeartbeat(Envelope):
    """Attempt ``attempt`` of ``step`` is still running on ``by``: its lease is renewed."""

    type: Literal["StepHeartbeat"] = "StepHeartbeat"
    step: Name
    attempt: int
    by: WorkerFacts


class StepSucceeded(Envelope):
    """Attempt ``attempt`` of ``step`` finished; its outputs are in the artifact store."""

    type: Literal["StepSucceeded"] = "StepSucceeded"
    step: Name
    attempt: int
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    duration_s: float
    by: WorkerFacts
    logs: ArtifactRef | None = Field(default=None, description="What the attempt printed")
    rode_on: RodeOn = Field(default_factory=dict)


MAX_STEP_ERROR_LENGTH = 8_000
"""The longest error line of a failed step that an event carries (workers cut longer ones)."""
MAX_TRACEBACK_LENGTH = 16_000
"""The longest step traceback that an event carries (workers keep the end of longer ones)."""


class StepFailed(Envelope):
    """Attempt ``attempt`` of ``step`` raised; ``retryable`` says whether a retry may help."""

    type: Literal["StepFailed"] = "StepFailed"
    step: Name
    attempt: int
    error: str = Field(max_length=MAX_STEP_ERROR_LENGTH, description="Type: message")
    traceback: str | None = Field(
        default=None,
        max_length=MAX_TRACEBACK_LENGTH,
        description="What the step raised, from its first frame outside Conveyor",
    )
    retryable: bool = True
    # Left out of the JSON when unset: controllers from before the field still take it.
    retry_after_s: float | None = Field(
        default=None,
        ge=0,
        le=MAX_RETRY_DELAY_S,
        allow_inf_nan=False,
        exclude_if=lambda value: value is None,
        description="The wait the step asked for before its next attempt (conveyor.Retry); "
        "None for its retry policy's",
    )
    duration_s: float = 0.0
    by: WorkerFacts
    logs: ArtifactRef | None = Field(default=None, description="What the attempt printed")
    rode_on: RodeOn = Field(default_factory=dict)


class StepStatusChanged(Envelope):
    """The controller recorded a new status for a step (for followers and dashboards)."""

    type: Literal["StepStatusChanged"] = "StepStatusChanged"
    step: Name
    status: StepStatus
    attempt: int
    error: str | None = None
    duration_s: float | None = None
    outputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    # Left out of the JSON when unset: followers from before the field still read it.
    retry_at: datetime | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="When a pending attempt that waits for its retry is due",
    )
    # Left out of the JSON when unset, as retry_at is.
    cached_from: Id | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="For a cached step: the run that computed the outputs it reused",
    )


class RunProgress(Envelope):
    """The status changes of one run recorded in one controller transaction, in order.

    Followers get one message per run and batch instead of one per step change: on a
    fan-out, status messages would otherwise outnumber the work itself.
    """

    type: Literal["RunProgress"] = "RunProgress"
    changes: list[StepStatusChanged]


Outcome = Annotated[StepSucceeded | StepFailed, Field(discriminator="type")]


MAX_OUTCOMES = (MAX_SIBLINGS + 1) * (MAX_RIDERS + 1)
"""The most outcomes of one StepsDone: every step of a message with siblings, and the
chains riding on each of them."""


class StepsDone(Envelope):
    """The outcomes of steps one worker ran on one message (a chain's riders run in place,
    a fan-out's branches that came as siblings), each step's after the one before it: one
    message for all of them. The controller takes each as if it had come alone."""

    type: Literal["StepsDone"] = "StepsDone"
    outcomes: list[Outcome] = Field(min_length=2, max_length=MAX_OUTCOMES)

    @model_validator(mode="after")
    def _of_the_run(self) -> StepsDone:
        if any(outcome.run_id != self.run_id for outcome in self.outcomes):
            raise ValueError("an outcome of another run")
        return self


class AttemptsCancelled(Envelope):
    """Broadcast to every worker: stop these attempts of the run where they are running.

    ``attempts`` maps a step to the attempt to stop; empty means every attempt of the run
    (the run was cancelled). A worker also drops such attempts still waiting in its queue.
    """

    type: Literal["AttemptsCancelled"] = "AttemptsCancelled"
    attempts: dict[Name, int] = Field(default_factory=dict, max_length=100_000)
    reason: str = Field(max_length=1000)


class RunFinished(Envelope):
    """The run reached a final status."""

    type: Literal["RunFinished"] = "RunFinished"
    status: RunStatus
    error: str | None = None


Event = Annotated[
    RunRequested
    | RunCancelRequested
    | StepReady
    | StepStarted
    | StepHeartbeat
    | StepSucceeded
    | StepFailed
    | StepsDone
    | StepStatusChanged
    | RunProgress
    | AttemptsCancelled
    | RunFinished,
    Field(discriminator="type"),
]
"""Any event of the current schema version."""

EVENT_TYPES: tuple[type[Envelope], ...] = (
    RunRequested,
    RunCancelRequested,
    StepReady,
    StepStarted,
    StepHeartbeat,
    StepSucceeded,
    StepFailed,
    StepsDone,
    StepStatusChanged,
    RunProgress,
    AttemptsCancelled,
    RunFinished,
)
COMPLETION_TYPES = (StepSucceeded, StepFailed)

_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


class MalformedEvent(ConveyorError):
    """Bytes that are not a valid event of a known type and schema version."""


def parse_event(data: bytes | str) -> Event:
    """Decode an event from JSON, or raise :class:`MalformedEvent` saying why."""
    try:
        return _event_adapter.validate_json(data)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "message"
        raise MalformedEvent(f"invalid event: {where}: {first['msg']}") from None


def progress_of(events: Sequence[Event]) -> list[Event]:
    """``events`` with the StepStatusChanged of each run folded into one RunProgress.

    Each run's progress comes before its other events, so that a follower sees every step
    change before the RunFinished of the same batch.
    """
    changes: dict[str, list[StepStatusChanged]] = {}
    rest: list[Event] = []
    for event in events:
        if isinstance(event, StepStatusChanged):
            changes.setdefault(event.run_id, []).append(event)
        else:
            rest.append(event)
    folded: list[Event] = [RunProgress(run_id=r, changes=c) for r, c in changes.items()]
    return folded + rest


E = TypeVar("E", bound=Envelope)
_Plan = tuple[tuple[str, Any, Callable[..., Any] | None], ...]


@functools.cache
def _plan(cls: type[Envelope]) -> _Plan:
    """Each field of ``cls`` in order, with its default (or its default factory)."""
    return tuple(
        (name, None if info.default is PydanticUndefined else info.default, info.default_factory)
        for name, info in cls.model_fields.items()
    )


def trusted(cls: type[E], **given: Any) -> E:
    """A ``cls`` event of ``given`` made without validation, the rest at their defaults.

    For the events the controller and workers make by the thousand from parts that were
    checked already (a StepReady of a validated spec and stored refs, a worker's outcome of
    the attempt it ran): validating them again was 5-8% of an embedded step. The caller
    passes every required field, each of its declared type; ``attempt`` and the like come
    from our own counters. What reaches a process from outside (a message on a broker, a
    request) is still parsed and validated (:func:`parse_event`).
    """
    values = {}
    for name, default, factory in _plan(cls):
        if name in given:
            values[name] = given[name]
        elif factory is not None:
            values[name] = factory()
        else:
            values[name] = default
    return prevalidated(cls, values, set(given))


def encode_event(event: Event) -> bytes:
    """The JSON bytes of an event."""
    return event.model_dump_json().encode()


def event_json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every event type, by type name."""
    return {cls.__name__: cls.model_json_schema() for cls in EVENT_TYPES}
