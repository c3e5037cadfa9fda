"""Materializers: how a step output becomes bytes in the artifact store, and back.

Pickle is never chosen unless the step opted in: unpickling is code execution. See
``registry`` for the order in which materializers are asked, and docs/materializers.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from conveyor.contracts import Materializer
from conveyor.workers.materializers.builtin import HASH_ALONGSIDE_MIN, InMemory, in_memory
from conveyor.workers.materializers.registry import (
    ENTRY_POINT_GROUP,
    REGISTRY,
    NoMaterializer,
    type_name,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "HASH_ALONGSIDE_MIN",
    "REGISTRY",
    "InMemory",
    "NoMaterializer",
    "by_name",
    "choose",
    "in_memory",
    "register_materializer",
    "trusted",
    "trusting",
    "type_name",
]

_trusted: ContextVar[frozenset[str]] = ContextVar("conveyor_trusted_types", default=frozenset())


@contextmanager
def trusting(types: Iterable[str]) -> Iterator[None]:
    """Within the block, materializers that refuse unknown types (skops) accept ``types``
    (qualified names such as ``mypackage.models.MyEstimator``)."""
    token = _trusted.set(frozenset(types))
    try:
        yield
    finally:
        _trusted.reset(token)


def trusted() -> frozenset[str]:
    """The type names the caller trusts for the load under way."""
    return _trusted.get()


def choose(value: object, *, allow_pickle: bool, what: str) -> Materializer:
    """The materializer that writes ``value``; ``what`` names the output in the error."""
    return REGISTRY.choose(value, allow_pickle=allow_pickle, what=what)


def by_name(name: str, *, allow_pickle: bool) -> Materializer:
    """The materializer that wrote an artifact; refuses pickle unless allowed."""
    return REGISTRY.by_name(name, allow_pickle=allow_pickle)


def register_materializer(
    materializer: Materializer, types: Iterable[type | str] = ()
) -> Materializer:
    """Store values of ``types`` (classes, or qualified names such as ``"mylib.Frame"``, which
    need not be imported) with ``materializer``; it is asked before conveyor's own. Without
    ``types``, its own ``types`` attribute counts; with neither, it is asked about every
    value that no typed materializer takes. Returns it."""
    REGISTRY.register(materializer, types)
    return materializer
