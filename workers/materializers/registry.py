"""Which materializer writes a value, and which one reads an artifact back.

Materializers come from three places, asked in this order for a value:

1. those registered with ``register_materializer`` (last registered first),
2. those shipped by installed distributions under the ``conveyor.materializers`` entry-point
   group (read once, at the first save or load, never when conveyor is imported),
3. conveyor's own: the optional ones (pandas, pyarrow, polars, scikit-learn, torch, paths),
   then str, bytes, numpy, pydantic, JSON and containers of all of these.

A materializer that declares ``types`` (qualified class names, or classes) is asked only about
values of those types or their subclasses; the most specific class wins, then the order above.
Types are matched by name along the value's MRO, so that knowing about pandas does not import
it. Pickle comes last, and only where a step or caller opts in.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from conveyor.contracts import ConveyorError, Materializer
from conveyor.workers.loggers import get_logger
from conveyor.workers.materializers import builtin
from conveyor.workers.steps import readable

ENTRY_POINT_GROUP = "conveyor.materializers"
MAX_CONTAINER_ITEMS = 10_000
"""A list, tuple or dict of more items than this is not stored item by item."""
log = get_logger("conveyor.materializers")


def qualified(cls: type) -> str:
    """``module.QualName`` of a class, as matched against declared types."""
    return f"{cls.__module__}.{cls.__qualname__}"


def type_name(value: object) -> str:
    """The qualified name of ``value``'s type, as recorded in an ArtifactRef."""
    return qualified(type(value))


@dataclass(frozen=True)
class _Lazy:
    """One of conveyor's optional materializers: imported when first needed."""

    name: str
    types: tuple[str, ...]
    target: str  # "module:attribute" under conveyor.workers.materializers
    extra: str

    def load(self) -> Materializer:
        module, _, attribute = self.target.partition(":")
        try:
            found = importlib.import_module(f"conveyor.workers.materializers.{module}")
        except ImportError as exc:
            raise ConveyorError(
                f"the {self.name!r} materializer needs {exc.name or 'a missing package'}: "
                f"pip install 'conveyor[{self.extra}]'",
                retryable=False,
            ) from None
        materializer: Materializer = getattr(found, attribute)()
        return materializer


# pandas 3 names its classes by their public module (pandas.DataFrame), pandas 2 did not.
OPTIONAL: tuple[_Lazy, ...] = (
    _Lazy(
        "pandas.dataframe",
        ("pandas.DataFrame", "pandas.core.frame.DataFrame"),
        "frames:PandasFrame",
        "pandas",
    ),
    _Lazy(
        "pandas.series",
        ("pandas.Series", "pandas.core.series.Series"),
        "frames:PandasSeries",
        "pandas",
    ),
    _Lazy("pyarrow.table", ("pyarrow.lib.Table",), "frames:ArrowTable", "pandas"),
    _Lazy(
        "polars.dataframe", ("polars.dataframe.frame.DataFrame",), "frames:PolarsFrame", "polars"
    ),
    _Lazy("sklearn.skops", ("sklearn.base.BaseEstimator",), "estimators:Skops", "sklearn"),
    _Lazy("torch.tensor", ("torch.Tensor",), "tensors:Tensor", "torch"),
    _Lazy("torch.state_dict", ("builtins.dict",), "tensors:StateDict", "torch"),
    _Lazy("path", ("pathlib.Path",), "paths:PathArchive", "path"),
)
"""Ordered as asked when two declare the same type."""

CONTAINER = _Lazy(
    "container",
    ("builtins.list", "builtins.tuple", "builtins.dict"),
    "containers:Container",
    "container",
)
BASE: tuple[Materializer, ...] = (
    builtin.StrMaterializer(),
    builtin.BytesMaterializer(),
    builtin.NumpyMaterializer(),
    builtin.PydanticMaterializer(),
    builtin.JsonMaterializer(),
)
PICKLE = builtin.PickleMaterializer()


@dataclass
class _Registered:
    materializer: Materializer | None
    types: tuple[str, ...]
    lazy: _Lazy | None = None

    @property
    def name(self) -> str:
        return self.lazy.name if self.lazy else self.ready().name

    def ready(self) -> Materializer:
        if self.materializer is None:
            assert self.lazy is not None
            self.materializer = self.lazy.load()
        return self.materializer


def _type_names(types: Iterable[type | str]) -> tuple[str, ...]:
    return tuple(t if isinstance(t, str) else qualified(t) for t in types)


class NoMaterializer(ConveyorError):
    """A value of a type that no enabled materializer writes."""


class Registry:
    """The materializers a process knows, in the order they are asked."""

    def __init__(self, *, discover: Callable[[], Sequence[Any]] | None = None) -> None:
        self._added: list[_Registered] = []
        self._plugins: list[_Registered] | None = None
        self._discover = discover or _entry_points
        self._optional = [_Registered(None, lazy.types, lazy) for lazy in OPTIONAL]
        self._container = _Registered(None, CONTAINER.types, CONTAINER)

    def register(self, materializer: Materializer, types: Iterable[type | str] = ()) -> None:
        """Ask ``materializer`` first about values of ``types`` (or about every value that
        no typed materializer takes, without types); replaces one of the same name."""
        for attribute in ("name", "version", "handles", "save", "load"):
            if not hasattr(materializer, attribute):
                raise TypeError(f"a materializer needs .{attribute}; {materializer!r} has none")
        names = _type_names(types) or _type_names(getattr(materializer, "types", ()))
        self._added = [r for r in self._added if r.name != materializer.name]
        self._added.insert(0, _Registered(materializer, names))

    def unregister(self, name: str) -> None:
        """Forget a materializer registered under ``name`` (tests, mostly)."""
        self._added = [r for r in self._added if r.name != name]

    def _typed(self) -> list[_Registered]:
        return [*self._added, *self.plugins(), *self._optional]

    def plugins(self) -> list[_Registered]:
        """The materializers of the entry-point group, read once; one that does not load is
        logged and left out (an artifact it wrote then reads as an unknown materializer)."""
        if self._plugins is None:
            loaded = (_plugin(found) for found in self._discover())
            self._plugins = [plugin for plugin in loaded if plugin is not None]
        return self._plugins

    def reload_plugins(self) -> None:
        """Read the entry points again at the next save or load (after a distribution was
        installed into a running process)."""
        self._plugins = None

    def choose(self, value: object, *, allow_pickle: bool, what: str) -> Materializer:
        """The materializer that writes ``value``; ``what`` names the output in the error."""
        found = self.find(value)
        if found is not None:
            return found
        if allow_pickle:
            return PICKLE
        described = self._unstorable_item(value) or f"a {readable(type_name(value))}"
        raise NoMaterializer(
            f"{what} is {described}, which no materializer can store: "
            "return a JSON-compatible value, str, bytes, a numpy array, a pydantic model, a "
            "DataFrame, an estimator, a tensor, a Path, or a list, tuple or dict of these; "
            "register a materializer for it (see docs/materializers.md), or opt in to pickle "
            "with @step(allow_pickle=True)",
            retryable=False,
        )

    def _unstorable_item(self, value: object) -> str | None:
        """``value`` described by its first item (or key) that nothing stores, if any."""
        if isinstance(value, dict):
            items: list[tuple[object, object]] = list(value.items())
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        else:
            return None
        if len(items) > MAX_CONTAINER_ITEMS:
            return f"a {type(value).__name__} of more than {MAX_CONTAINER_ITEMS} items"
        for key, item in items:
            kind = type(value).__name__
            if isinstance(value, dict) and not isinstance(key, str):
                return f"a dict with a key of type {readable(type_name(key))} (not a string)"
            if self.find(item) is None:
                return f"a {kind} whose item {str(key)[:100]!r} is a {readable(type_name(item))}"
        return None

    def find(self, value: object) -> Materializer | None:
        """The first materializer that takes ``value``, pickle aside; None if none does."""
        mro = [qualified(cls) for cls in type(value).__mro__]
        typed = self._typed()
        for cls in mro:
            for entry in typed:
                if cls in entry.types and entry.ready().handles(value):
                    return entry.ready()
        for entry in typed:
            if not entry.types and entry.ready().handles(value):
                return entry.ready()
        for materializer in BASE:
            if materializer.handles(value):
                return materializer
        if set(mro) & set(self._container.types) and self._container.ready().handles(value):
            return self._container.ready()
        return None

    def by_name(self, name: str, *, allow_pickle: bool) -> Materializer:
        """The materializer that wrote an artifact; refuses pickle unless allowed."""
        if name == PICKLE.name:
            if not allow_pickle:
                raise ConveyorError(
                    "this artifact was pickled; loading it runs code, so pass allow_pickle=True "
                    "(or @step(allow_pickle=True) on the consuming step) if you trust it",
                    retryable=False,
                )
            return PICKLE
        for materializer in BASE:
            if materializer.name == name:
                return materializer
        for entry in [*self._typed(), self._container]:
            if entry.name == name:
                return entry.ready()
        raise ConveyorError(
            f"unknown materializer {name[:100]!r}: install or register the library that "
            "wrote this artifact",
            retryable=False,
        )


def _entry_points() -> Sequence[Any]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _plugin(found: Any) -> _Registered | None:
    """An entry point's materializer: ``module:attribute``, an instance or a class."""
    try:
        target = found.load()
        materializer = target() if isinstance(target, type) else target
    except Exception as exc:
        log.warning(
            "materializer entry point does not load",
            group=ENTRY_POINT_GROUP,
            entry_point=found.name,
            target=found.value,
            error=f"{type(exc).__name__}: {exc}",
        )
        return None
    return _Registered(materializer, _type_names(getattr(materializer, "types", ())))


REGISTRY = Registry()
"""The process's materializers; ``register_materializer`` adds to it."""
