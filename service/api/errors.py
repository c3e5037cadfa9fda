"""Errors as HTTP sees them: one table from Conveyor's error classes to status codes.

Services raise ``NotFoundError``, ``ConflictError`` and ``ValidationError``; the API adds the
two it alone can raise (no or a wrong token, a path outside the store). One handler turns
each into a JSON body ``{"error", "message", "status"}`` or, for the dashboard, a page.
"""

from __future__ import annotations

from conveyor.contracts import (
    ArtifactUnreadable,
    ConflictError,
    ConveyorError,
    NotAllowed,
    NotFoundError,
    ValidationError,
)
from conveyor.service.pipelines import PipelineTooLarge


class Unauthorized(ConveyorError):
    """The request has no valid token (HTTP 401)."""


class Forbidden(ConveyorError):
    """The request asks for something it may never have, like a file outside the store."""


class LoginRequired(ConveyorError):
    """A dashboard page was asked for without a session: show the login form."""

    def __init__(self, next_path: str) -> None:
        super().__init__("this dashboard needs the server's token: log in at /login")
        self.next_path = next_path


# Checked in order: the first class the error is an instance of decides.
STATUS: tuple[tuple[type[ConveyorError], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (PipelineTooLarge, 413, "too_large"),
    (ValidationError, 422, "invalid"),
    (Unauthorized, 401, "unauthorized"),
    (LoginRequired, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (NotAllowed, 403, "forbidden"),
    # An artifact whose bytes are gone or do not match its digest: the store is at fault.
    (ArtifactUnreadable, 500, "artifact_unreadable"),
)
# Any other ConveyorError is something the caller asked for that cannot be done as asked,
# unless trying again may work (a broker that does not answer): then the service is at fault.
DEFAULT_STATUS = (400, "bad_request")
RETRYABLE_STATUS = (503, "unavailable")
RETRY_AFTER_S = 5
"""What a 503 tells a client to wait before it tries again."""


def status_of(exc: ConveyorError) -> tuple[int, str]:
    """The HTTP status and the short error code of ``exc``."""
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return RETRYABLE_STATUS if exc.retryable else DEFAULT_STATUS


def error_body(status: int, code: str, message: str) -> dict[str, object]:
    return {"error": code, "message": message, "status": status}
