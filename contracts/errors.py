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
