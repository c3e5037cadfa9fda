"""The root of Conveyor's error hierarchy.

Whether an error is worth retrying is data (``retryable``), not a class family.
"""

from __future__ import annotations

from typing import Any

from conveyor.contracts.enums import RunStatus
from conveyor.contracts.limits import MAX_RETRY_DELAY_S

SHOWN_CHARACTERS = 100
"""How much of a value typed by a user an error message quotes: it may be huge or hostile."""


def shown(text: str) -> str:
    """``text`` quoted for an error message, cut if it is long."""
    cut = text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."
    return repr(cut)


class ConveyorError(Exception):
    """Any error Conveyor reports to a user.

    ``retryable`` says whether running the same thing again could succeed.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class NotFoundError(ConveyorError):
    """A named or identified thing does not exist (an HTTP 404, a CLI exit 1)."""


class ConflictError(ConveyorError):
    """A rule refused the change: a name exists, a component is in use (an HTTP 409)."""


class NotAllowed(ConveyorError):
    """The caller may not do this: another user's stack or component, or an admin's task."""


class ValidationError(ConveyorError):
    """Input has the wrong shape: an unknown config key, a wrong type (an HTTP 422)."""


class AmbiguousId(ValidationError):
    """A typed id prefix starts more than one record's id; ``candidates`` lists some."""

    def __init__(self, message: str, *, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


class RunFailed(ConveyorError):
    """A run that the caller waited for ended failed or cancelled.

    ``run`` is what the caller would have had back (calling a pipeline: its ``RunHandle``),
    so the outputs of the steps that finished can still be loaded. ``step``, ``step_error``
    and ``step_traceback`` describe the first step that failed, if one did (a run can also
    fail before any step runs, or be cancelled).
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        status: RunStatus,
        run: Any = None,
        step: str | None = None,
        step_error: str | None = None,
        step_traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.run = run
        self.step = step
        self.step_error = step_error
        self.step_traceback = step_traceback


class ArtifactUnreadable(ConveyorError):
    """Stored bytes are missing, outside their store, or do not match their digest."""


class OutsideStore(ArtifactUnreadable):
    """A URI that does not name an object of the store it is read from: refused unread."""


class StoreUnavailable(ConveyorError):
    """An artifact store cannot be used: unreachable, a missing bucket, refused credentials.

    The message names the store (bucket and endpoint, or directory) and what to check.
    """


class UntrustedStep(ConveyorError):
    """A StepReady names code a worker will not run: not a ``@step`` of the run's code
    archive or of a package the worker trusts. Such a message is dead-lettered."""


class Retry(ConveyorError):
    """Raised by a step: try it again in ``after`` seconds (for a rate limit, a resource
    not ready yet), instead of after its retry policy's wait.

    The attempt uses one of the step's ``retries``; with none left, the step fails. The
    wait is at most the step's ``max_retry_delay``.
    """

    def __init__(self, after: float = 0.0, reason: str = "the step asked to be retried") -> None:
        if not 0 <= after <= MAX_RETRY_DELAY_S:  # NaN fails this too
            raise ValueError(
                f"Retry(after=...) takes 0 to {MAX_RETRY_DELAY_S:.0f} seconds, not {after!r}"
            )
        super().__init__(f"{reason} (asked for a retry in {after:g}s)", retryable=True)
        self.after = float(after)
        self.reason = reason


class Fatal(ConveyorError):
    """Raised by a step: it fails now, whatever retries it has left; its downstream steps
    are skipped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
