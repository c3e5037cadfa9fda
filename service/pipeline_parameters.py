"""A pipeline's parameters checked against its function's signature before a run starts.

A wrong value would otherwise pass through the steps upstream of the one that uses it and
fail there, a run later. Each parameter is validated by pydantic against its annotation
(lax: ``"100"`` is an ``int``); an unannotated parameter takes anything JSON can carry.
Parameters travel as JSON, so a validated value is handed to the pipeline in its JSON form.
"""

from __future__ import annotations

import difflib
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
import pydantic_core

from conveyor.contracts import ValidationError
from conveyor.workers.steps import either

MAX_SHOWN_VALUE = 60
"""Characters of a refused value quoted in the message (a value may be huge or hostile)."""


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ParameterError(ValidationError):
    """Parameters that do not fit the pipeline's signature: unknown, missing, or of the
    wrong type (a CLI exit 2, an HTTP 422). Raised before anything runs."""


def type_name(hint: Any) -> str:
    """How a parameter's annotation reads in a message: ``int``, ``list[int]``, ``int | None``."""
    if hint is None or hint is type(None):
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is ... else type_name(a) for a in args)}]"
    return str(getattr(hint, "__qualname__", None) or hint).replace("typing.", "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 1] + "…"


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:
        # A name imported under TYPE_CHECKING, say: check what resolves, take the rest as is.
        return {k: v for k, v in fn.__annotations__.items() if not isinstance(v, str)}


class PipelineParameters:
    """The named parameters of one pipeline function, with a validator for each."""

    def __init__(self, pipeline: str, fn: Callable[..., Any]) -> None:
        self._pipeline = pipeline
        self._signature = inspect.signature(fn)
        hints = _hints(fn)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        self._named = {
            name: param
            for name, param in self._signature.parameters.items()
            if param.kind not in variadic
        }
        self._any_keyword = any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in self._signature.parameters.values()
        )
        self._types = {name: hints.get(name, Any) for name in self._named}
        self._adapters: dict[str, pydantic.TypeAdapter[Any] | None] = {}

    def _adapter(self, name: str) -> pydantic.TypeAdapter[Any] | None:
        """The validator of ``name``; None where anything goes (no annotation, or a type
        pydantic cannot check)."""
        if name not in self._adapters:
            hint = self._types.get(name, Any)
            try:
                self._adapters[name] = None if hint is Any else pydantic.TypeAdapter(hint)
            except (pydantic.PydanticUserError, TypeError):
                self._adapters[name] = None
        return self._adapters[name]

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
        """The arguments by name, defaults applied, each validated; a ParameterError names
        every parameter that is unknown, missing or of the wrong type."""
        self._check_names(len(args), kwargs)
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ParameterError(f"pipeline {self._pipeline!r}: {exc}") from None
        given = [name for name in bound.arguments if name in self._named]
        # As pydantic does with defaults, a default is taken as written (`x: int = None`).
        bound.apply_defaults()
        problems = []
        for name in given:
            value = bound.arguments[name]
            try:
                bound.arguments[name] = self._validated(name, value)
            except pydantic.ValidationError as exc:
                problems.append(self._wrong_type(name, value, exc))
        if problems:
            raise ParameterError(f"pipeline {self._pipeline!r}: " + "; ".join(problems))
        return bound

    def _check_names(self, positional: int, kwargs: Mapping[str, Any]) -> None:
        problems = []
        if not self._any_keyword:
            problems += [self._unknown(name) for name in kwargs if name not in self._named]
        for index, (name, param) in enumerate(self._named.items()):
            given = name in kwargs or (index < positional and param.kind in _POSITIONAL)
            if param.default is inspect.Parameter.empty and not given:
                problems.append(f"missing parameter {name!r} ({type_name(self._types[name])})")
        if problems:
            raise ParameterError(f"pipeline {self._pipeline!r}: " + "; ".join(problems))

    def _unknown(self, name: str) -> str:
        known = list(self._named)
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            return f"no parameter {name!r}; did you mean {either(close)}?"
        listed = ", ".join(known) if known else "none"
        return f"no parameter {name!r} (its parameters: {listed})"

    def _validated(self, name: str, value: Any) -> Any:
        adapter = self._adapter(name)
        if adapter is None:
            return value
        checked = adapter.validate_python(value)
        try:
            return adapter.dump_python(checked, mode="json")
        except pydantic_core.PydanticSerializationError:
            return checked  # not JSON: the compiler says so, with the parameter's name

    def _wrong_type(self, name: str, value: Any, exc: pydantic.ValidationError) -> str:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        reason = first["msg"][:1].lower() + first["msg"][1:]
        at = f" at {where}" if where else ""
        return (
            f"parameter {name!r} expects {type_name(self._types[name])}, "
            f"got {_shown(value)}{at}: {reason}"
        )

    def from_text(self, pairs: Mapping[str, str]) -> dict[str, Any]:
        """Values given as text (``-p name=value``): each as JSON where that fits the
        parameter's type, else the text itself (``-p name=100`` to a ``str`` stays "100")."""
        values: dict[str, Any] = {}
        for name, text in pairs.items():
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                values[name] = text
                continue
            adapter = self._adapter(name) if name in self._named else None
            if adapter is not None:
                try:
                    adapter.validate_python(value)
                except pydantic.ValidationError:
                    value = text
            values[name] = value
        return values
