"""Step definitions: the ``@step`` decorator, output names, references, and what a worker runs.

A step is named on the wire by a reference (``package.module:function`` or
``path/to/file.py:function``) plus, for code that is not an installed package, the code archive
that holds it (see ``code_archive``). The client imports references freely (``load_reference``);
a worker goes through ``StepResolver``, which runs only ``@step`` functions of the run's archive
or of packages it trusts: a message is data, never an instruction to import arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_args, overload

from conveyor.contracts import (
    DEFAULT_POOL,
    ConveyorError,
    Isolation,
)

FILE_MODULE_PREFIX = "conveyor_user_"

F = TypeVar("F", bound=Callable[..., Any])


class InvocationRecorder(Protocol):
    """What a pipeline under construction does with a step call (see service.pipelines)."""

    def record(self, step: StepDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Add an invocation of ``step`` to the DAG; return handles to its outputs."""


# Set while a pipeline function runs to build its DAG; outside it, a step call runs the body.
building: ContextVar[InvocationRecorder | None] = ContextVar("conveyor_building", default=None)


def output_names(fn: Callable[..., Any]) -> list[str]:
    """``[]`` for ``-> None``; ``output_0..`` for a fixed tuple; else ``["output"]``."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = getattr(fn, "__annotations__", {})
    if "return" not in hints:
        return ["output"]
    ret = hints["return"]
    if ret is None or ret is type(None):
        return []
    if typing.get_origin(ret) is tuple:
        args = typing.get_args(ret)
        if args and args[-1] is not Ellipsis:
            return [f"output_{i}" for i in range(len(args))]
    return ["output"]


def _module_file(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    filename = getattr(module, "__file__", None)
    if filename is None:
        return None
    path = Path(filename).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def reference_of(obj: Any) -> str:
    """The importable reference of a function, by module name or by file path.

    Modules that were run as a script or loaded from a file have no importable name, so
    their path (relative to the working directory when inside it) stands in.
    """
    module_name = obj.__module__
    if module_name == "__main__" or module_name.startswith(FILE_MODULE_PREFIX):
        path = _module_file(module_name)
        if path is not None:
            return f"{path}:{obj.__qualname__}"
    return f"{module_name}:{obj.__qualname__}"


def _load_file(path_text: str) -> types.ModuleType:
    path = Path(path_text).expanduser().resolve()
    name = FILE_MODULE_PREFIX + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise ConveyorError(f"no such file: {path_text}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConveyorError(f"cannot load {path_text} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Scripts import their siblings the way `python script.py` would let them.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_reference(ref: str) -> Any:
    """Import the object named by ``ref``; a ConveyorError says what went wrong."""
    module_part, sep, qualname = ref.rpartition(":")
    if not sep or not module_part or not qualname:
        raise ConveyorError(f"{ref!r} is not a reference: use module:name or file.py:name")
    try:
        if module_part.endswith(".py") or "/" in module_part:
            module = _load_file(module_part)
        else:
            module = importlib.import_module(module_part)
        obj: Any = module
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
    except ConveyorError as exc:
        raise ConveyorError(f"cannot import {ref!r}: {exc}") from None
    except Exception as exc:
        raise ConveyorError(f"cannot import {ref!r}: {type(exc).__name__}: {exc}") from exc
    return obj


class StepDefinition:
    """A function made into a step; called inside a pipeline it adds a node to the DAG."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        pool: str = DEFAULT_POOL,
        allow_pickle: bool = False,
        isolation: Isolation | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        if isolation is not None and isolation not in get_args(Isolation):
            raise ValueError(f"isolation must be 'thread' or 'process', not {isolation!r}")
        if isolation == "process" and inspect.iscoroutinefunction(fn):
            raise ValueError(
                f"{fn.__name__} is an async step: it runs on the worker's event loop and is "
                "cancelled where it awaits; isolation='process' is for plain functions"
            )
        self.fn = fn
        self.name = name or fn.__name__
        self.retries = retries
        self.timeout = timeout
        self.pool = pool
        self.allow_pickle = allow_pickle
        self.isolation = isolation
        self.signature = inspect.signature(fn)
        self.outputs = output_names(fn)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def ref(self) -> str:
        """The importable reference that workers use to find this step."""
        return reference_of(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        recorder = building.get()
        if recorder is None:
            return self.fn(*args, **kwargs)
        return recorder.record(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<step {self.name} ({self.ref})>"


@overload
def step(fn: F, /) -> StepDefinition: ...


@overload
def step(
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    pool: str = DEFAULT_POOL,
    allow_pickle: bool = False,
    isolation: Isolation | None = None,
) -> Callable[[F], StepDefinition]: ...


def step(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    pool: str = DEFAULT_POOL,
    allow_pickle: bool = False,
    isolation: Isolation | None = None,
) -> StepDefinition | Callable[[F], StepDefinition]:
    """Make a function a pipeline step.

    ``retries`` extra attempts after a failure; ``timeout`` seconds per attempt; ``pool`` the
    worker pool whose queue runs it; ``allow_pickle`` lets its outputs (and inputs) be pickled;
    ``isolation`` where a plain function's body runs: ``"thread"`` (a thread of the worker,
    abandoned at the timeout) or ``"process"`` (a child process, killed at the timeout);
    ``None`` takes the worker's default.
    Outputs: one, or several with a ``tuple[...]`` return annotation, or none for ``-> None``.
    """

    def wrap(function: Callable[..., Any]) -> StepDefinition:
        return StepDefinition(
            function,
            name=name,
            retries=retries,
            timeout=timeout,
            pool=pool,
            allow_pickle=allow_pickle,
            isolation=isolation,
        )

    return wrap(fn) if fn is not None else wrap
