"""Structured logs: structlog with run id, step and attempt bound by the worker runtime."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVEL_ENV = "CONVEYOR_LOG_LEVEL"


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Log to stderr; JSON lines when not on a terminal (or with ``json=True``)."""
    name = (level or os.environ.get(LEVEL_ENV) or "WARNING").upper()
    as_json = json if json is not None else not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[name]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
