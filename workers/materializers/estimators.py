"""scikit-learn estimators through skops (``conveyor[sklearn]``): a skops file is a zip of
JSON and arrays, and loading it builds only the types the reader trusts.

skops trusts scikit-learn's own estimators and numpy's and scipy's types. Any other type in
the file (a transformer of your own, a function) is refused, naming it, unless the load
trusts it: ``@step(trust=[...])`` on the consuming step, ``run.load(..., trust=[...])``,
``Client.load_artifact(..., trust=[...])`` or ``conveyor artifact get --trust NAME``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from conveyor.contracts import ArtifactRef, ConveyorError
from conveyor.workers import materializers
from conveyor.workers.steps import FILE_MODULE_PREFIX, readable

SHOWN_TYPES = 20
"""At most this many untrusted type names are quoted in the error."""


class UntrustedTypes(ConveyorError):
    """A skops file holds types the load does not trust."""


def _skops() -> Any:
    import skops.io

    return skops.io


def _shown(names: list[str]) -> str:
    """``names`` for an error: the first ``SHOWN_TYPES``, each cut short, and how many more."""
    shown = ", ".join(name[:200] for name in names[:SHOWN_TYPES])
    more = f" and {len(names) - SHOWN_TYPES} more" if len(names) > SHOWN_TYPES else ""
    return shown + more


def untrusted_error(names: list[str]) -> UntrustedTypes:
    """The error that names the untrusted types and says how to trust them."""
    example = ", ".join(repr(name[:200]) for name in names[:2])
    return UntrustedTypes(
        f"the stored estimator holds types that are not trusted: {_shown(names)}. Loading "
        "builds them, which runs their code: if you trust them, pass "
        f"trust=[{example}{', ...' if len(names) > 2 else ''}] to the consuming @step, to "
        "run.load() or Client.load_artifact(), or --trust to conveyor artifact get",
        retryable=False,
    )


def scripts_not_loaded(names: Iterable[str]) -> list[str]:
    """The types of ``names`` that are classes of a pipeline script loaded by path (its
    module name is generated) which this process has not loaded: no trust builds them."""
    return sorted(
        name
        for name in names
        if name.startswith(FILE_MODULE_PREFIX) and name.split(".", 1)[0] not in sys.modules
    )


def refused_types(needed: Iterable[str], trusted: frozenset[str]) -> list[str]:
    """The types ``trusted`` does not cover. A class of a script loaded by path lives in a
    generated module; it is trusted by that name or by the one its refusal shows the user
    (``train.py:Doubler``), since that is the name the error tells them to pass."""
    return sorted({name for name in needed if not {name, readable(name)} & trusted})


class Skops:
    """A scikit-learn estimator (a Pipeline, a fitted model) as a skops file."""

    name = "sklearn.skops"
    version = "1"
    types = ("sklearn.base.BaseEstimator",)

    def handles(self, value: object) -> bool:
        from sklearn.base import BaseEstimator

        return isinstance(value, BaseEstimator)

    def save(self, value: object, path: str) -> str | None:
        _skops().dump(value, path)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        skops = _skops()
        needed = list(skops.get_untrusted_types(file=path))
        elsewhere = scripts_not_loaded(needed)
        if elsewhere:
            raise UntrustedTypes(
                "the stored estimator holds classes of a pipeline file "
                f"({_shown(elsewhere)}) as another "
                "process loaded it (a client running the script, or a worker running another "
                "version of the pipeline's code), which this process has not loaded: they "
                "cannot be built here whatever is trusted. Define such classes in a package "
                "that every process imports (installed where the steps run, or listed in the "
                "orchestrator's trusted_packages), or run the step that made it again "
                "(--no-cache) so that this version of the code writes it",
                retryable=False,
            )
        refused = refused_types(needed, materializers.trusted())
        if refused:
            raise untrusted_error(refused)
        return skops.load(path, trusted=needed)
