"""Step definitions: the ``@step`` decorator, output names, references, and what a worker runs.

A step is named on the wire by a reference (``package.module:function`` or
``path/to/file.py:function``) plus, for code that is not an installed package, the code archive
that holds it (see ``code_archive``). The client imports references freely (``load_reference``);
a worker goes through ``StepResolver``, which runs only ``@step`` functions of the run's archive
or of packages it trusts: a message is data, never an instruction to import arbitrary code.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_args, overload

from conveyor.contracts import (
    DEFAULT_MAX_RETRY_DELAY_S,
    DEFAULT_POOL,
    ConveyorError,
    Isolation,
)
from conveyor.workers.retry_options import retry_policy

FILE_MODULE_PREFIX = "conveyor_user_"


def is_script_module(module: str) -> bool:
    """Whether ``module`` is a pipeline file's (a name the loading process made up)."""
    return module == "__main__" or module.startswith(FILE_MODULE_PREFIX)


F = TypeVar("F", bound=Callable[..., Any])


class InvocationRecorder(Protocol):
    """What a pipeline under construction does with a step call (see service.pipelines)."""

    def record(self, step: StepDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Add an invocation of ``step`` to the DAG; return handles to its outputs."""


# Set while a pipeline function runs to build its DAG; outside it, a step call runs the body.
building: ContextVar[InvocationRecorder | None] = ContextVar("conveyor_building", default=None)

# Set while a worker imports a file or module of a run's code (to find a step, or a class
# that its inputs need): what it imports. Code of that file that runs at import must not
# start runs: they would wait for this worker, whose slots wait for the import.
importing_run_code: ContextVar[str | None] = ContextVar("conveyor_importing_run_code", default=None)


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


def script_file(module_name: str) -> Path | None:
    """The file, symlinks resolved, of a script module or a file loaded by path (see
    ``is_script_module``); None for any other module, or one without a file."""
    if not is_script_module(module_name):
        return None
    filename = getattr(sys.modules.get(module_name), "__file__", None)
    if filename is None:
        return None
    return _resolved(filename if os.path.isabs(filename) else os.path.abspath(filename))


@functools.lru_cache(maxsize=256)
def _resolved(filename: str) -> Path:
    # Asked on each compile of a script's pipeline, for each of its steps (a run's submit
    # costs three or more): resolving walks the path, a system call a folder, and a loaded
    # module stays the file it was loaded from.
    return Path(filename).resolve()


def _module_file(module_name: str) -> str | None:
    path = script_file(module_name)
    return None if path is None else shown_path(path)


def reference_of(obj: Any) -> str:
    """The importable reference of a function, by module name or by file path.

    Modules that were run as a script or loaded from a file have no importable name, so
    their path (relative to the working directory when inside it) stands in.
    """
    module_name = obj.__module__
    path = _module_file(module_name)
    return f"{path or module_name}:{obj.__qualname__}"


SHOWN_FILE = "__conveyor_file__"
"""The attribute that holds, on a module loaded from a file, the file as its user names it."""
_GENERATED_NAME = re.compile(FILE_MODULE_PREFIX + r"\w+(\.(?=\w))?")


def readable(text: str) -> str:
    """``text`` with each generated module name (a file loaded by path has one) replaced by
    the file it was loaded from, as its user names it: messages speak of the user's files."""

    def shown(match: re.Match[str]) -> str:
        name, dot = match.group(0).removesuffix("."), match.group(1)
        file = getattr(sys.modules.get(name), SHOWN_FILE, None)
        if file is None:
            return match.group(0)
        return f"{file}:" if dot else str(file)  # a name in it reads as in a reference

    return _GENERATED_NAME.sub(shown, text)


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when inside it, else absolute."""
    return _shown(path, os.getcwd())


@functools.lru_cache(maxsize=256)
def _shown(path: Path, folder: str) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def load_file(path_text: str) -> types.ModuleType:
    """The module of the file ``path_text`` as this process loads a pipeline file by its
    path (under a name of its absolute path), loaded once."""
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
    setattr(module, SHOWN_FILE, shown_path(path))
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


class MissingName(ConveyorError):
    """A reference whose module loads but has no such name; ``names`` are those it has."""

    def __init__(self, where: str, name: str, names: dict[str, Any]) -> None:
        self.where = where
        self.name = name
        self.names = names
        super().__init__(missing_name(where, name, list(names)))


def missing_name(where: str, name: str, known: list[str], kind: str = "name") -> str:
    """``where`` has no ``name``: with the close matches among ``known``, or a short list."""
    public = [k for k in known if not k.startswith("_")]
    close = difflib.get_close_matches(name, public, n=3)
    if close:
        return f"{where} has no {kind} {name!r}; did you mean {either(close)}?"
    if kind != "name" and 0 < len(public) <= 10:
        return f"{where} has no {kind} {name!r} (it has: {', '.join(public)})"
    return f"{where} has no {kind} {name!r}"


def either(names: list[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def load_reference(ref: str) -> Any:
    """Import the object named by ``ref``; a ConveyorError says what went wrong (a
    MissingName, with the close matches, for a name the module does not have)."""
    module_part, sep, qualname = ref.rpartition(":")
    if not sep or not module_part or not qualname:
        raise ConveyorError(f"{ref!r} is not a reference: use module:name or file.py:name")
    is_file = module_part.endswith(".py") or "/" in module_part
    try:
        module = load_file(module_part) if is_file else importlib.import_module(module_part)
    except ConveyorError as exc:
        raise ConveyorError(f"cannot import {ref!r}: {exc}") from None
    except Exception as exc:
        raise ConveyorError(
            f"cannot import {ref!r}: {type(exc).__name__}: {readable(str(exc))}"
        ) from exc
    obj: Any = module
    where = module_part if is_file else f"module {module_part!r}"
    for attr in qualname.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            names = vars(obj) if hasattr(obj, "__dict__") else {}
            raise MissingName(where, attr, dict(names)) from None
        where = f"{where}:{attr}"
    return obj


class StepDefinition:
    """A function made into a step; called inside a pipeline it adds a node to the DAG."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        retries: int = 0,
        retry_delay: float = 0.0,
        backoff: float = 2.0,
        max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY_S,
        jitter: bool = False,
        timeout: float | None = None,
        pool: str = DEFAULT_POOL,
        allow_pickle: bool = False,
        isolation: Isolation | None = None,
        trust: Sequence[str | type] = (),
        cache: bool = True,
    ) -> None:
        self.retry = retry_policy(
            retries=retries,
            retry_delay=retry_delay,
            backoff=backoff,
            max_retry_delay=max_retry_delay,
            jitter=jitter,
        )
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
        self.trust = _type_names(trust)
        self.cache = cache
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


def _type_names(trust: Sequence[str | type]) -> tuple[str, ...]:
    """Qualified type names from names or classes; refuses a bare string for a list."""
    if isinstance(trust, str):
        raise ValueError(f"trust takes a list of type names: trust=[{trust[:100]!r}]")
    names = tuple(t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for t in trust)
    for name in names:
        if not name or len(name) > 500:
            raise ValueError(f"a trusted type name is 1 to 500 characters, not {len(name)}")
    return names


@overload
def step(fn: F, /) -> StepDefinition: ...


@overload
def step(
    *,
    name: str | None = None,
    retries: int = 0,
    retry_delay: float = 0.0,
    backoff: float = 2.0,
    max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY_S,
    jitter: bool = False,
    timeout: float | None = None,
    pool: str = DEFAULT_POOL,
    allow_pickle: bool = False,
    isolation: Isolation | None = None,
    trust: Sequence[str | type] = (),
    cache: bool = True,
) -> Callable[[F], StepDefinition]: ...


def step(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    retry_delay: float = 0.0,
    backoff: float = 2.0,
    max_retry_delay: float = DEFAULT_MAX_RETRY_DELAY_S,
    jitter: bool = False,
    timeout: float | None = None,
    pool: str = DEFAULT_POOL,
    allow_pickle: bool = False,
    isolation: Isolation | None = None,
    trust: Sequence[str | type] = (),
    cache: bool = True,
) -> StepDefinition | Callable[[F], StepDefinition]:
    """Make a function a pipeline step.

    ``retries`` extra attempts after a failure, retry ``n`` after ``retry_delay * backoff **
    (n - 1)`` seconds (at most ``max_retry_delay``; with ``jitter``, between half and all of
    that), waited by the controller, not a worker; a step that raises ``conveyor.Retry``
    chooses its wait, one that raises ``conveyor.Fatal`` fails with no retry. ``timeout``
    seconds per attempt; ``pool`` the
    worker pool whose queue runs it; ``allow_pickle`` lets its outputs (and inputs) be pickled;
    ``isolation`` where a plain function's body runs: ``"thread"`` (a thread of the worker,
    abandoned at the timeout) or ``"process"`` (a child process, killed at the timeout);
    ``None`` takes the worker's default; ``trust`` names types (``"pkg.module.Class"``) that
    its inputs may build although their materializer refuses unknown types by default
    (scikit-learn estimators, read through skops); ``cache=False`` runs it every time
    instead of reusing the outputs of an earlier run with the same code, parameters and
    inputs (docs/caching.md).
    Outputs: one, or several with a ``tuple[...]`` return annotation, or none for ``-> None``.
    """

    def wrap(function: Callable[..., Any]) -> StepDefinition:
        return StepDefinition(
            function,
            name=name,
            retries=retries,
            retry_delay=retry_delay,
            backoff=backoff,
            max_retry_delay=max_retry_delay,
            jitter=jitter,
            timeout=timeout,
            pool=pool,
            allow_pickle=allow_pickle,
            isolation=isolation,
            trust=trust,
            cache=cache,
        )

    return wrap(fn) if fn is not None else wrap
