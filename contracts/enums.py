"""The enumerations of the records: plain ``StrEnum``s with no pydantic behind them, and how
messages name a component type.

Apart from ``models`` so that what needs only these (the CLI's option types, shown by
``conveyor --help``) does not build the record models.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

Isolation = Literal["thread", "process"]
"""Where a sync step's body runs: a thread of the worker (abandoned at its timeout), or a
child process of the worker (killed at its timeout). Here, not beside the pipeline spec, so
that a flavor's configuration (``rabbitmq``'s default isolation) builds no spec models."""


class ComponentType(StrEnum):
    """The kinds of stack component; a stack has at most one of each."""

    ORCHESTRATOR = "orchestrator"
    ARTIFACT_STORE = "artifact_store"


def label(type_: ComponentType) -> str:
    """How messages name a component type: 'orchestrator', 'artifact store'."""
    return type_.value.replace("_", " ")


class Role(StrEnum):
    """What a user of a server may do: an admin everything, a member their own things."""

    ADMIN = "admin"
    MEMBER = "member"


class RunStatus(StrEnum):
    """Lifecycle of a pipeline run."""

    QUEUED = "queued"
    """Requested through the stack's broker, and no controller has taken it yet: only the
    client that asked knows of it."""
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepStatus(StrEnum):
    """Lifecycle of one step of a run."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    CACHED = "cached"


FINISHED_STEP_STATUSES = frozenset(
    {
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.SKIPPED,
        StepStatus.CANCELLED,
        StepStatus.CACHED,
    }
)
FINISHED_RUN_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
