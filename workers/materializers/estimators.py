"""scikit-learn estimators through skops (``conveyor[sklearn]``): a skops file is a zip of
JSON and arrays, and loading it builds only the types the reader trusts.

skops trusts scikit-learn's own estimators and numpy's and scipy's types. Any other type in
the file (a transformer of your own, a function) is refused, naming it, unless the load
trusts it: ``@step(trust=[...])`` on the consuming step, ``run.load(..., trust=[...])``,
``Client.load_artifact(..., trust=[...])`` or ``conveyor artifact get --trust NAME``. A class
of a pipeline file is built with the same file's class of the code at hand (see
``script_classes``), trusted by its file name (``mk.py:Doubler``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from conveyor.contracts import ArtifactRef, ConveyorError
from conveyor.workers import materializers, script_classes
from conveyor.workers.steps import readable

SCHEMA = "schema.json"
"""The member of a skops file that names its types (the rest are arrays)."""
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


def refused_types(
    needed: Iterable[str], trusted: frozenset[str], stand_ins: Mapping[str, str] | None = None
) -> list[str]:
    """The types ``trusted`` does not cover. A class of a script loaded by path lives in a
    generated module; it is trusted by that name or by the one its refusal shows the user
    (``train.py:Doubler``), since that is the name the error tells them to pass, and so is
    the class of the code at hand that stands in for it (``stand_ins``), by its own name."""
    stand_ins = stand_ins or {}
    return sorted(
        {name for name in needed if not {name, readable(name), stand_ins.get(name, name)} & trusted}
    )


def _not_here(
    lost: list[str], trusted: frozenset[str], code: script_classes.CodeAtHand
) -> UntrustedTypes:
    names = [script_classes.shown(name) for name in lost]
    return UntrustedTypes(
        f"the stored estimator holds classes of a pipeline file ({_shown(names)}) under the "
        "name another process, or another version of the pipeline's code, gave that file. "
        "They are built with the classes of the same file of the code at hand: "
        f"{code.lacking(names, trusted)}. Else define such classes in a package that every "
        "process imports (installed where the steps run, or listed in the orchestrator's "
        "trusted_packages), or run the step that made it again (--no-cache) so that this "
        "version of the code writes it",
        retryable=False,
    )


@contextmanager
def _renamed(path: str, renames: Mapping[str, str]) -> Iterator[str]:
    """``path``, or a copy of it whose types of the modules ``renames`` names are those of
    the modules it maps them to: skops looks a type up by its module's name."""
    if not renames:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="conveyor-skops-") as folder:
        copy = os.path.join(folder, "renamed.skops")
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
            for info in source.infolist():
                if info.filename == SCHEMA:
                    schema = _rename(json.loads(source.read(info)), renames)
                    target.writestr(info, json.dumps(schema))
                    continue
                with source.open(info) as read, target.open(info, "w") as write:
                    shutil.copyfileobj(read, write, 1 << 20)
        yield copy


def _rename(node: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(node, list):
        return [_rename(item, renames) for item in node]
    if not isinstance(node, dict):
        return node
    renamed = {key: _rename(value, renames) for key, value in node.items()}
    module = renamed.get("__module__")
    if "__class__" in renamed and isinstance(module, str) and module in renames:
        renamed["__module__"] = renames[module]
    return renamed


def _moved(type_name: str, renames: Mapping[str, str]) -> str:
    module, _, name = type_name.rpartition(".")
    return f"{renames[module]}.{name}" if module in renames else type_name


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
        trusted = materializers.trusted()
        code = script_classes.at_hand()
        found = script_classes.stand_ins(needed, trusted, code)
        if found.lost:
            raise _not_here(found.lost, trusted, code)
        refused = refused_types(needed, trusted, found.names)
        if refused:
            raise untrusted_error([found.names.get(name, name) for name in refused])
        # Imported only now, for classes the load trusts.
        renames = script_classes.renames(found.names, code)
        now = [_moved(name, renames) for name in needed]
        with _renamed(path, renames) as actual:
            return skops.load(actual, trusted=now)
