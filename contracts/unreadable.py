"""Messages that are not an event this release can read, and the run they belong to.

A newer release may send a field an older one refuses (``extra="forbid"``): the message is
dead-lettered all the same, and the run it belongs to is told, when its identity can still
be read: its type, its run, for an attempt's event the step and attempt, the attempts it
carries (a ``StepsDone``'s outcomes, a ``StepReady``'s siblings), and whether an
``AttemptsCancelled`` stops every attempt of its run. That read is
lenient about everything else and as strict as the real models about those fields; it
parses JSON and nothing more (nothing in the message is imported or evaluated).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, WrapValidator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from conveyor.contracts.events import EVENT_TYPES, MAX_OUTCOMES, MAX_SIBLINGS
from conveyor.contracts.models import Frozen, Id, Name

MAX_UNREADABLE_BYTES = 64 * 1024 * 1024
"""The largest message whose identity is read; a larger one is only dead-lettered."""
MAX_REASON_LENGTH = 1000
"""The longest reason an unreadable message carries (a dead-letter header's bound too)."""
MAX_VERSION_LENGTH = 64
VERSION_PATTERN = rf"^[0-9A-Za-z][0-9A-Za-z.+!_-]{{0,{MAX_VERSION_LENGTH - 1}}}$"
"""A release's version as its sender gives it: the characters of a PEP 440 version."""

_EVENT_TYPE_NAMES = frozenset(cls.__name__ for cls in EVENT_TYPES)
_ATTEMPT_TYPES = frozenset(
    {"StepReady", "StepStarted", "StepHeartbeat", "StepSucceeded", "StepFailed"}
)
"""The events of one attempt of a step: their identity names the step and the attempt."""
_version = re.compile(VERSION_PATTERN)
T = TypeVar("T")


class Identity(Frozen):
    """Whose an unreadable message was: enough to tell its run, nothing more."""

    type: str = Field(max_length=64, description="Its event type, one this release knows")
    run_id: Id
    step: Name | None = Field(default=None, description="The step of an attempt's event")
    attempt: int | None = Field(default=None, ge=1, description="The attempt of its event")
    pipeline: Name | None = Field(default=None, description="A RunRequested's pipeline")
    whole_run: bool = Field(
        default=False,
        description="An AttemptsCancelled that stops every attempt of its run (the run was "
        "cancelled): its ``attempts`` is there and empty",
    )
    carried: tuple[tuple[Name, Annotated[int, Field(ge=1)]], ...] = Field(
        default=(),
        max_length=MAX_OUTCOMES,
        description="The attempts the message carries besides its own, (step, attempt) each, "
        "those that could be read: a StepsDone's outcomes, a StepReady's siblings",
    )


class Unreadable(Frozen):
    """A message that is not an event this release can read, though its identity is."""

    identity: Identity
    reason: str = Field(max_length=MAX_REASON_LENGTH, description="Why it cannot be read")
    sender_version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="The Conveyor release of its sender, when the message said which",
    )


def _or_none(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except PydanticValidationError:
        return None


Lenient = Annotated[T | None, WrapValidator(_or_none)]
"""A field read if it is valid, else None, never an error."""


class _Step(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Name


class _Outcome(BaseModel):
    model_config = ConfigDict(extra="ignore")
    run_id: Id
    step: Name
    attempt: Annotated[int, Field(ge=1)]


class _Sibling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    run_id: Id
    step: _Step
    attempt: Annotated[int, Field(ge=1)]


class _Read(BaseModel):
    """The identity fields of any event, every other field ignored unread."""

    model_config = ConfigDict(extra="ignore")
    type: Annotated[str, Field(max_length=64)]
    run_id: Id
    step: Lenient[_Step | Name] = None  # a StepReady's step spec; the others' step name
    attempt: Lenient[Annotated[int, Field(ge=1)]] = None
    pipeline: Lenient[Name] = None
    # Only whether it is there and empty is used: a cancellation of some attempts names them.
    attempts: Lenient[dict[str, Any]] = None
    # The attempts it carries, each read on its own: one that cannot be read leaves the others.
    outcomes: Lenient[Annotated[list[Lenient[_Outcome]], Field(max_length=MAX_OUTCOMES)]] = None
    siblings: Lenient[Annotated[list[Lenient[_Sibling]], Field(max_length=MAX_SIBLINGS)]] = None

    def carried(self) -> tuple[tuple[str, int], ...]:
        """The attempts of this run that the message carries besides its own. A StepReady's
        riders are not among them: each follows a step that fails with the message, and is
        skipped with it."""
        if self.type == "StepsDone":
            named = [(o.run_id, o.step, o.attempt) for o in self.outcomes or () if o is not None]
        elif self.type == "StepReady":
            named = [(s.run_id, s.step.name, s.attempt) for s in self.siblings or () if s]
        else:
            return ()
        return tuple((step, attempt) for run_id, step, attempt in named if run_id == self.run_id)


def read_identity(data: bytes | str) -> Identity | None:
    """The identity of a message that :func:`parse_event` refused, or None if even that
    cannot be read (not JSON, no known type, no valid run id, too large)."""
    if len(data) > MAX_UNREADABLE_BYTES:
        return None
    try:
        read = _Read.model_validate_json(data)
    except (PydanticValidationError, ValueError):
        return None
    if read.type not in _EVENT_TYPE_NAMES:
        return None
    if read.type in _ATTEMPT_TYPES:
        step = read.step.name if isinstance(read.step, _Step) else read.step
        if step is None or read.attempt is None:
            return Identity(type=read.type, run_id=read.run_id, carried=read.carried())
        return Identity(
            type=read.type,
            run_id=read.run_id,
            step=step,
            attempt=read.attempt,
            carried=read.carried(),
        )
    if read.type == "RunRequested":
        return Identity(type=read.type, run_id=read.run_id, pipeline=read.pipeline)
    if read.type == "StepsDone":
        return Identity(type=read.type, run_id=read.run_id, carried=read.carried())
    if read.type == "AttemptsCancelled":
        # Only an ``attempts`` that is there and empty says "the whole run": one that is
        # missing may have given way to a field of a later release that names fewer.
        whole_run = read.attempts is not None and not read.attempts
        return Identity(type=read.type, run_id=read.run_id, whole_run=whole_run)
    return Identity(type=read.type, run_id=read.run_id)


def read_version(value: object) -> str | None:
    """A sender's Conveyor version from a message header, or None if absent or unlike one."""
    if isinstance(value, bytes) and len(value) <= MAX_VERSION_LENGTH:
        value = value.decode("ascii", errors="replace")
    if not isinstance(value, str) or len(value) > MAX_VERSION_LENGTH:
        return None
    return value if _version.fullmatch(value) else None


def unreadable(identity: Identity, reason: str, sender_version: str | None) -> Unreadable:
    """An :class:`Unreadable` of ``identity``, its ``reason`` cut to the bound."""
    cut = reason if len(reason) <= MAX_REASON_LENGTH else reason[: MAX_REASON_LENGTH - 3] + "..."
    return Unreadable(identity=identity, reason=cut, sender_version=sender_version)
