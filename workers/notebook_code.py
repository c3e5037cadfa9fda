"""Steps typed into notebook cells, written out as one module that travels with a run.

A cell is not a file, so the client writes one: ``notebook_cells.py``, with the source of the
run's cell steps (``inspect.getsource`` reads IPython's cells through ``linecache``) and of
what they use from the notebook. A module the cells imported becomes an import line, a name
imported from a module a ``from`` import, a plain constant (numbers, text, and tuples, lists,
sets and dicts of them) a literal, and a function typed in a cell comes with its source, and
so on for what it uses. Anything else a step uses from the notebook (an object in a variable,
a class typed in a cell) is refused by name. The module is executed once on the client before
it ships: it must define each step as the notebook does, or the run is refused.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import inspect
import sys
import textwrap
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.contracts import ConveyorError
from conveyor.workers.steps import StepDefinition

MODULE_FILE = "notebook_cells.py"
"""The file, at the root of its own code archive, that holds a run's cell steps."""

_HEADER = "# Written by Conveyor from notebook cells: a run's steps and what they use.\n"
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"})
_MOVE = "define it in a .py file next to the notebook and import it there"


@dataclass(frozen=True)
class CellModule:
    """The source of ``notebook_cells.py`` and its digest (sha256 of the text)."""

    source: str
    digest: str


def _called_names(code: types.CodeType) -> set[str]:
    """The global names a function's code (nested functions included) reads or writes."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in _LOADS}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _called_names(const)
    return {str(name) for name in names}


def _definition_names(source: str) -> set[str]:
    """The names a ``def`` evaluates where it is defined: decorators, defaults, annotations."""
    [node] = ast.parse(source).body
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    args = node.args
    evaluated: list[ast.AST | None] = [*node.decorator_list, *args.defaults, node.returns]
    evaluated += [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    evaluated += [d for d in args.kw_defaults]
    evaluated += [a.annotation for a in (args.vararg, args.kwarg) if a is not None]
    return {
        n.id
        for part in evaluated
        if part is not None
        for n in ast.walk(part)
        if isinstance(n, ast.Name)
    }


def _is_literal(value: Any) -> bool:
    try:
        return bool(ast.literal_eval(repr(value)) == value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _importable(value: Any) -> tuple[str, str] | None:
    """(module, name) that imports ``value`` elsewhere as the same object, if one does."""
    target = value.fn if isinstance(value, StepDefinition) else value
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if not isinstance(module, str) or not isinstance(name, str) or module == "__main__":
        return None
    if getattr(sys.modules.get(module), name, None) is not value:
        return None
    return module, name


def _typed_function(value: Any) -> bool:
    target = value.fn if isinstance(value, StepDefinition) else value
    return inspect.isfunction(target) and target.__module__ == "__main__"


def _source_of(name: str, fn: Any, step: str) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise ConveyorError(
            f"step {step!r} uses {name!r}, whose source the notebook no longer has: {_MOVE}"
        ) from None
    if "<locals>" in fn.__qualname__ or fn.__name__ != name:
        raise ConveyorError(
            f"step {step!r} uses {name!r}, which is not a function defined at the top of a "
            f"cell under that name: {_MOVE}"
        )
    return source


class _Writer:
    """Collects what the cell steps use from the notebook's namespace."""

    def __init__(self, namespace: Mapping[str, Any], installed: frozenset[str]) -> None:
        self.namespace = namespace
        self.installed = installed
        self.imports: dict[str, str] = {}
        self.constants: dict[str, str] = {}
        self.functions: dict[str, str] = {}

    def add_function(self, name: str, fn: Any, step: str) -> None:
        target = fn.fn if isinstance(fn, StepDefinition) else fn
        source = _source_of(name, target, step)
        self.functions[name] = source
        code = target.__code__
        for used in sorted(_called_names(code) | _definition_names(source)):
            self.add_name(used, step)

    def add_name(self, name: str, step: str) -> None:
        if name in self.functions or name in self.imports or name in self.constants:
            return
        if name not in self.namespace:
            return  # a builtin, or a name the body assigns before it reads it
        value = self.namespace[name]
        if isinstance(value, types.ModuleType):
            module = self._shipped(value.__name__, name, step)
            self.imports[name] = (
                f"import {module}" if module == name else (f"import {module} as {name}")
            )
        elif (found := _importable(value)) is not None:
            module, qualname = found
            self._shipped(module, name, step)
            alias = "" if qualname == name else f" as {name}"
            self.imports[name] = f"from {module} import {qualname}{alias}"
        elif _typed_function(value):
            self.functions[name] = ""  # before its own names, should it call itself
            self.add_function(name, value, step)
        elif _is_literal(value):
            self.constants[name] = f"{name} = {value!r}"
        elif inspect.isclass(value):
            raise ConveyorError(
                f"step {step!r} uses the class {name!r}, typed into a cell: classes do not "
                f"travel to remote workers from cells; {_MOVE}"
            )
        else:
            raise ConveyorError(
                f"step {step!r} uses the notebook's {name!r} (of type {type(value).__name__}), "
                "which cannot travel to remote workers: pass it to the step as a parameter "
                f"or an output of another step, or {_MOVE}"
            )

    def _shipped(self, module: str, name: str, step: str) -> str:
        """``module``, if workers can import it: of the standard library or installed."""
        top = module.partition(".")[0]
        if top in sys.stdlib_module_names or top in self.installed:
            return module
        raise ConveyorError(
            f"step {step!r} uses {name!r} from {module!r}, a module of a local folder that "
            f"the notebook's steps cannot take along: define step {step!r} in a .py file "
            "beside that module and import it"
        )

    def source(self) -> str:
        parts = [_HEADER, *sorted(self.imports.values())]
        if self.constants:
            parts += ["", *(self.constants[name] for name in sorted(self.constants))]
        # What a function uses was found after it: written before it, for its decorators.
        for name in reversed(self.functions):
            parts += ["", "", self.functions[name].rstrip()]
        return "\n".join(parts) + "\n"


def cell_module(
    steps: Iterable[StepDefinition], namespace: Mapping[str, Any], installed: frozenset[str]
) -> CellModule:
    """The module of ``steps`` (typed in cells of the notebook whose globals are
    ``namespace``), checked by executing it; ConveyorError names what cannot travel.
    ``installed``: top-level packages the workers have, as the client does."""
    writer = _Writer(namespace, installed)
    wanted = {}
    for definition in steps:
        name = definition.fn.__name__
        if namespace.get(name) is not definition:
            raise ConveyorError(
                f"step {definition.name!r} is not the notebook's {name!r} (defined again, or "
                f"inside a function): run its cell again, or {_MOVE}"
            )
        wanted[name] = definition.name
        writer.add_function(name, definition, definition.name)
    source = writer.source()
    _check(source, wanted)
    return CellModule(source, hashlib.sha256(source.encode()).hexdigest())


def _check(source: str, wanted: Mapping[str, str]) -> None:
    module: dict[str, Any] = {"__name__": "notebook_cells"}
    try:
        exec(compile(source, MODULE_FILE, "exec"), module)  # the user's own cells, again
    except Exception as exc:
        raise ConveyorError(
            f"the notebook's steps do not run outside the notebook "
            f"({type(exc).__name__}: {exc}): {_MOVE}"
        ) from None
    for name, step in wanted.items():
        if not isinstance(module.get(name), StepDefinition):
            raise ConveyorError(
                f"step {step!r} is not made by a @step decorator on its def: add one, or {_MOVE}"
            )
