"""Public names of a package imported on first use, so that importing the package (or one
light part of it) does not build every model behind it (``conveyor``, ``conveyor.contracts``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def names_on_first_use(
    package: str, sources: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose public names are the
    keys of ``sources``, each imported from the module it maps to when first asked for and
    kept in the package's ``namespace`` from then on."""

    def first_use(name: str) -> Any:
        source = sources.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        namespace[name] = value  # found once; later lookups skip this function
        return value

    def listed() -> list[str]:
        return sorted({*namespace, *sources})

    return first_use, listed
