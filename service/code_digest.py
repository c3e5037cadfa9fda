"""The code part of a step's cache key: a digest of the step function's source and of what
it uses from user code.

Starting from the step function, every global name its code reads is looked up where the
function was defined (``__globals__``). A function or class defined in user code (a script,
a notebook cell, a package outside the standard library and site-packages, never conveyor)
adds its source, and what it uses in turn; a constant (numbers, text, and tuples, lists,
sets and dicts of them) adds its value. A function's default values and the variables it
closes over count too (an object that is no constant by its repr). Sources are compared as
syntax trees, so comments, blank lines and formatting change nothing; the step's own
decorators (its ``@step`` options) are left out. What the digest cannot see is listed in
docs/caching.md: a function reached through an attribute (``helpers.clean(...)``), files
read at run time, randomness.
"""

from __future__ import annotations

import ast
import dis
import hashlib
import inspect
import sys
import sysconfig
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conveyor.workers.steps import StepDefinition

_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
MAX_CONSTANT_REPR = 10_000
"""A constant's value counts up to this many characters of its repr."""


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {str(Path(p).resolve()) for p in list(roots)}
    return tuple(sorted(roots))


_INSTALLED = _installed_roots()


def is_user_code(obj: Any) -> bool:
    """Whether ``obj`` (a function or class) was defined in user code: a script, a notebook
    cell, or a module outside the standard library, site-packages and conveyor."""
    module_name = getattr(obj, "__module__", None)
    if not isinstance(module_name, str):
        return False
    if module_name == "__main__":
        return True
    if module_name == "conveyor" or module_name.startswith("conveyor."):
        return False
    filename = getattr(sys.modules.get(module_name), "__file__", None)
    if not isinstance(filename, str):
        return False  # a builtin module
    return not filename.startswith(_INSTALLED)


MAX_REMEMBERED_CODES = 4096
"""Code objects whose source text and global names are remembered (per process)."""
_by_code: dict[tuple[int, str], tuple[types.CodeType, str | tuple[str, ...]]] = {}


def _of_code(code: types.CodeType, kind: str, make: Callable[[], Any]) -> Any:
    """What ``make`` says of ``code``, made once per code object. A code object never
    changes, and a function defined again (a notebook cell run again, a module reloaded)
    has a new one; the values its global names stand for are looked up at each digest.
    Compiling a pipeline takes the digest of each of its step functions: without this,
    reading and parsing their source was half of what submitting a small run cost."""
    key = (id(code), kind)
    known = _by_code.get(key)
    if known is not None and known[0] is code:
        return known[1]
    made = make()
    if len(_by_code) >= MAX_REMEMBERED_CODES:
        _by_code.clear()
    _by_code[key] = (code, made)
    return made


def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names a code object (nested functions and lambdas included) reads."""
    return _of_code(code, "names", lambda: tuple(_read_names(code)))  # type: ignore[no-any-return]


def _read_names(code: types.CodeType) -> Iterator[str]:
    for instruction in dis.get_instructions(code):
        if instruction.opname in _LOADS:
            yield str(instruction.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _read_names(const)


def _normalized(source: str, *, drop_decorators: bool) -> str:
    """The syntax tree of ``source`` as text: formatting and comments do not count."""
    tree = ast.parse(textwrap.dedent(source))
    if drop_decorators:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                node.decorator_list = []
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _source_text(obj: Any, *, drop_decorators: bool) -> str:
    if inspect.isfunction(obj):  # its source is that of its code (a class's may change)
        kind = "bare source" if drop_decorators else "source"
        read = lambda: _read_source(obj, drop_decorators=drop_decorators)  # noqa: E731
        return _of_code(obj.__code__, kind, read)  # type: ignore[no-any-return]
    return _read_source(obj, drop_decorators=drop_decorators)


def _read_source(obj: Any, *, drop_decorators: bool) -> str:
    try:
        return _normalized(inspect.getsource(obj), drop_decorators=drop_decorators)
    except (OSError, TypeError, SyntaxError):
        # No source (a function made with exec, say): its compiled code stands in.
        code = getattr(obj, "__code__", None)
        return repr(code.co_code) + repr(code.co_consts) if code is not None else ""


def _is_constant(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return True
    if isinstance(value, tuple | list | set | frozenset):
        return all(_is_constant(v) for v in value)
    if isinstance(value, dict):
        return all(_is_constant(k) and _is_constant(v) for k, v in value.items())
    return False


def _constant_text(value: Any) -> str:
    if isinstance(value, set | frozenset):
        return f"{type(value).__name__}({sorted(map(_constant_text, value))})"
    if isinstance(value, dict):
        items = sorted((_constant_text(k), _constant_text(v)) for k, v in value.items())
        return f"dict({items})"
    return repr(value)[:MAX_CONSTANT_REPR]


def _codes_of(obj: Any) -> Iterator[tuple[types.CodeType, dict[str, Any]]]:
    """The code objects of a function, or of a class's methods, with their globals."""
    if inspect.isfunction(obj):
        yield obj.__code__, obj.__globals__
    elif inspect.isclass(obj):
        for member in vars(obj).values():
            function = member.__func__ if isinstance(member, classmethod | staticmethod) else member
            if isinstance(function, property):
                for part in (function.fget, function.fset, function.fdel):
                    if inspect.isfunction(part):
                        yield part.__code__, part.__globals__
            elif inspect.isfunction(function):
                yield function.__code__, function.__globals__
            elif isinstance(function, StepDefinition):
                yield function.fn.__code__, function.fn.__globals__


def _values_used(obj: Any) -> Iterator[tuple[str, Any]]:
    """What a function or class reads besides its source: the globals its code names, and
    for a function its default values and the variables it closes over."""
    for code, namespace in _codes_of(obj):
        for global_name in _global_names(code):
            if global_name in namespace:  # else a builtin, or a name it never finds
                yield f"global {global_name}", namespace[global_name]
    if inspect.isfunction(obj):
        for index, default in enumerate(obj.__defaults__ or ()):
            yield f"default {index}", default
        for key, default in sorted((obj.__kwdefaults__ or {}).items()):
            yield f"default {key}", default
        for free, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f"closure {free}", cell.cell_contents
            except ValueError:  # not bound yet
                continue


def _object_text(value: Any) -> str:
    try:
        return f"{type(value).__qualname__}:{repr(value)[:MAX_CONSTANT_REPR]}"
    except Exception:
        return f"{type(value).__qualname__}:{id(value)}"


def _unwrapped(value: Any) -> Any:
    return value.fn if isinstance(value, StepDefinition) else value


def code_digest(fn: Callable[..., Any]) -> str:
    """``sha256:`` and the digest of ``fn``'s source and of what it uses from user code."""
    fn = _unwrapped(fn)
    # Named by qualified name without the module: a script's module name depends on where
    # its folder is, and moving a project must not empty its cache.
    parts: list[tuple[str, str]] = []
    seen: set[int] = {id(fn)}
    todo: list[Any] = [fn]
    while todo:
        obj = todo.pop()
        name = str(getattr(obj, "__qualname__", "?"))
        parts.append((f"code {name}", _source_text(obj, drop_decorators=obj is fn)))
        for label, value in _values_used(obj):
            value = _unwrapped(value)
            if inspect.isfunction(value) or inspect.isclass(value):
                if id(value) not in seen and is_user_code(value):
                    seen.add(id(value))
                    todo.append(value)
            elif _is_constant(value):
                parts.append((f"value {name}.{label}", _constant_text(value)))
            elif not label.startswith("global "):
                # A default or a closed-over object: its repr, which may change each run
                # (an address in it): a miss, never a wrong hit.
                parts.append((f"value {name}.{label}", _object_text(value)))
    digest = hashlib.sha256()
    for label, text in sorted(set(parts)):
        digest.update(f"{len(label)}:{label}{len(text)}:{text}".encode())
    return f"sha256:{digest.hexdigest()}"
