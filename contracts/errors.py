"""The root of Conveyor's error hierarchy.

Whether an error is worth retrying is data (``retryable``), not a class family.
"""

from __future__ import annotations


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


class ValidationError(ConveyorError):
    """Input has the wrong shape: an unknown config key, a wrong type (an HTTP 422)."""


class AmbiguousId(ValidationError):
    """A typed id prefix starts more than one record's id; ``candidates`` lists some."""

    def __init__(self, message: str, *, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


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
