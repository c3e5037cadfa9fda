"""Conveyor's structlog loggers, which leave structlog's configuration to the application.

A logger of ``get_logger`` logs through structlog's configuration once the process has one:
the CLI's and the service processes' ``configure_logging``, or an embedding application's
own. Until then it logs as ``configure_logging()`` would (to stderr, from WARNING or
``$CONVEYOR_LOG_LEVEL`` up, JSON lines when stderr is not a terminal) through settings of its
own, so that embedding Conveyor neither reconfigures the application's structlog nor prints
Conveyor's INFO lines on its stdout (structlog's defaults, unconfigured).

structlog is imported when a logger is first used, not here: the CLI's ``--help`` imports
this module (through ``service/logs.py``) and must not pay for structlog.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from structlog.types import Processor

LEVEL_ENV = "CONVEYOR_LOG_LEVEL"

# Taken at import, before an embedded worker pool wraps stderr to capture what steps print:
# Conveyor's own lines are not a step's.
_STDERR = sys.stderr


def level_number(level: str | None = None) -> int:
    """``level``, else ``$CONVEYOR_LOG_LEVEL``, else WARNING, as logging's number."""
    name = (level or os.environ.get(LEVEL_ENV) or "WARNING").upper()
    return logging.getLevelNamesMapping()[name]


def processors(as_json: bool) -> list[Processor]:
    """What each line goes through: context (run id, step, attempt), level, time, rendering."""
    import structlog

    renderer: Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]


def get_logger(name: str) -> Any:
    """The logger ``name`` of a Conveyor module (see the module's docstring)."""
    return _Logger(name)


class _Logger:
    """structlog's logger ``name`` once structlog is configured; Conveyor's default until then."""

    __slots__ = ("_configured", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._configured: Any = None

    def _target(self) -> Any:
        import structlog

        if not structlog.is_configured():
            return _unconfigured()
        if self._configured is None:
            self._configured = structlog.get_logger(self._name)
        return self._configured

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)


@functools.cache
def _unconfigured() -> Any:
    import structlog

    return structlog.wrap_logger(
        structlog.PrintLogger(_STDERR),
        processors=processors(as_json=not _STDERR.isatty()),
        wrapper_class=structlog.make_filtering_bound_logger(level_number()),
    )
