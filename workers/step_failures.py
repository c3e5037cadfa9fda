"""A failed step as a person reads it: the traceback of their code first, both texts bounded.

Conveyor's own frames (the worker calling the step, or importing its module) come before
the user's in every traceback a step raises; they are cut, so that the first frame shown is
the step's.
"""

from __future__ import annotations

import traceback
from types import TracebackType

from conveyor.contracts import ConveyorError, Retry
from conveyor.contracts.events import MAX_STEP_ERROR_LENGTH, MAX_TRACEBACK_LENGTH

IMPORT_MACHINERY = frozenset({"importlib", "importlib._bootstrap", "importlib._bootstrap_external"})
"""Modules whose frames sit between a worker and a step module that fails as it is imported."""


def _is_conveyors(frame: TracebackType) -> bool:
    module = frame.tb_frame.f_globals.get("__name__")
    if not isinstance(module, str):
        return False
    return module == "conveyor" or module.startswith("conveyor.") or module in IMPORT_MACHINERY


def user_traceback(exc: BaseException) -> str | None:
    """The traceback of ``exc`` from the first frame that is not Conveyor's, bounded to its
    last ``MAX_TRACEBACK_LENGTH`` characters.

    With no frame of the user's: the whole traceback (a fault of Conveyor's, worth
    reporting), or ``None`` for a ``ConveyorError``, whose message is the whole story.
    """
    first = exc.__traceback__
    while first is not None and _is_conveyors(first):
        first = first.tb_next
    if first is None:
        if isinstance(exc, ConveyorError):
            return None
        first = exc.__traceback__
    text = "".join(traceback.format_exception(type(exc), exc, first))
    return keep_tail(text, MAX_TRACEBACK_LENGTH)


def retry_after(exc: BaseException) -> float | None:
    """The wait before its next attempt that a step asked for by raising ``Retry``."""
    return exc.after if isinstance(exc, Retry) else None


def keep_tail(text: str, limit: int) -> str:
    """``text``, or its last characters after a line saying it was cut, within ``limit``
    characters: a traceback's end holds the frame that raised and the error."""
    if len(text) <= limit:
        return text
    marker = f"[cut to its end: {len(text)} characters in all]\n"
    return marker + text[len(text) - (limit - len(marker)) :]


def keep_head(text: str, limit: int) -> str:
    """``text``, or its first characters and a note that it was cut, within ``limit``."""
    if len(text) <= limit:
        return text
    marker = f" [cut: {len(text)} characters in all]"
    return text[: limit - len(marker)] + marker


def error_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, bounded; a ``__str__`` that fails does not hide it."""
    try:
        message = str(exc)
    except Exception:
        message = "<the error's message could not be made>"
    return keep_head(f"{type(exc).__name__}: {message}", MAX_STEP_ERROR_LENGTH)
