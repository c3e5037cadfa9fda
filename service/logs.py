"""structlog configured for a whole process, by its entry point: the CLI, ``worker start``,
``server up``, a benchmark. An application that embeds Conveyor configures its own, or asks
for this one; ``Conveyor.start()`` never configures it (``workers/loggers.py``)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from conveyor.workers.loggers import LEVEL_ENV, level_number, processors

__all__ = ["LEVEL_ENV", "configure_logging", "configure_logging_when_used"]


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Configure structlog for the whole process: log to stderr, JSON lines when not on a
    terminal (or with ``json=True``), from ``level`` (else ``$CONVEYOR_LOG_LEVEL``, else
    WARNING) up.

    For a process's entry point (the CLI, ``worker start``, ``server up``, a benchmark) or an
    application that wants its structlog configured so; ``Conveyor.start()`` never calls it.
    """
    import structlog

    as_json = json if json is not None else not sys.stderr.isatty()
    structlog.configure(
        processors=processors(as_json),
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def configure_logging_when_used() -> None:
    """``configure_logging()`` as soon as anything imports structlog, or now if it has.

    For the CLI: most commands never log, and importing structlog (with the rich tracebacks
    it loads) takes longer than the rest of such a command's start; a command that does log
    imports it first, and so logs as configured, to stderr, never unconfigured to stdout.
    """
    if "structlog" in sys.modules:
        configure_logging()
    else:
        sys.meta_path.insert(0, _AfterImport("structlog", configure_logging))


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds one top-level module as usual, and calls ``then`` once it has been executed."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self._name = name
        self._then = then
        self._loader: importlib.abc.Loader | None = None

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)  # once, and so that the search below finds the real one
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._loader is not None
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._loader is not None
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._then()
