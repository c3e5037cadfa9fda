"""Broker topology names, defined once: adapters and ``deploy/`` derive theirs from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.contracts.models import Frozen

# Events are routed by the type name each carries, not by class: the names of a stack's
# queues and exchanges serve parts that handle no event (a flavor's configuration, the CLI's
# listings), and importing the event classes builds every event model.
if TYPE_CHECKING:
    from conveyor.contracts.events import Event

DEFAULT_PREFIX = "conveyor"
_RUN_TYPES = ("RunRequested", "RunCancelRequested")
_STATUS_TYPES = ("StepStatusChanged", "RunProgress", "RunFinished")


class Topology(Frozen):
    """Exchange and queue names of one stack.

    Every name starts with ``prefix`` and the stack name, so that several stacks (or several
    test runs) share one broker without seeing each other's messages.
    """

    stack: str
    prefix: str = DEFAULT_PREFIX

    @property
    def base(self) -> str:
        """The common start of every name of this stack."""
        return f"{self.prefix}.{self.stack}"

    @property
    def exchange(self) -> str:
        """Direct exchange that routes work and completion events."""
        return self.base

    @property
    def status_exchange(self) -> str:
        """Topic exchange of run status events, routed by run id, for followers."""
        return f"{self.base}.status"

    @property
    def control_exchange(self) -> str:
        """Fan-out exchange of control events every worker hears (attempts to stop)."""
        return f"{self.base}.control"

    @property
    def dead_letter_exchange(self) -> str:
        """Where rejected messages go, with the reason in a header."""
        return f"{self.base}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """The queue that keeps dead letters for a person to look at."""
        return f"{self.base}.dead"

    @property
    def exchanges(self) -> list[str]:
        """Every exchange of the stack (its queues: ``queue_names`` of the worker side)."""
        return [
            self.exchange,
            self.status_exchange,
            self.control_exchange,
            self.dead_letter_exchange,
        ]

    @property
    def events_queue(self) -> str:
        """Completion events from workers, consumed by the controller."""
        return f"{self.base}.events"

    @property
    def runs_queue(self) -> str:
        """RunRequested and RunCancelRequested messages, consumed by the controller."""
        return f"{self.base}.runs"

    def step_queue(self, pool: str) -> str:
        """StepReady messages of one worker pool."""
        return f"{self.base}.steps.{pool}"

    def route(self, event: Event) -> str:
        """The queue an event is published to (status events: the run id as routing key;
        control events: none, every worker hears them)."""
        if event.type == "StepReady":
            return self.step_queue(event.step.pool)
        if event.type in _RUN_TYPES:
            return self.runs_queue
        if event.type in _STATUS_TYPES:
            return event.run_id
        if event.type == "AttemptsCancelled":
            return ""
        return self.events_queue


def is_status_event(event: Event) -> bool:
    """Whether ``event`` is a status update for followers rather than work."""
    return event.type in _STATUS_TYPES


def is_control_event(event: Event) -> bool:
    """Whether ``event`` is broadcast to every worker rather than queued for one consumer."""
    return event.type == "AttemptsCancelled"
