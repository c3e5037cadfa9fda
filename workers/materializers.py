"""Materializers: how a step output becomes bytes in the artifact store, and back.

Pickle is never chosen unless the step opted in: unpickling is code execution.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from conveyor.contracts import ArtifactRef, ConveyorError, Materializer


def type_name(value: object) -> str:
    """The qualified name of ``value``'s type, as recorded in an ArtifactRef."""
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_type(qualified: str) -> Any:
    module_name, _, qualname = qualified.rpartition(".")
    # A nested class (A.B) needs a shorter module path: try successively shorter ones.
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name, qualname = ".".join(parts[:cut]), ".".join(parts[cut:])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in qualname.split("."):
            obj = getattr(obj, attr)
        return obj
    raise ConveyorError(f"cannot import type {qualified!r}")


class StrMaterializer:
    name = "str"

    def handles(self, value: object) -> bool:
        return isinstance(value, str)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, str)
        return value.encode()

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        return data.decode()


class BytesMaterializer:
    name = "bytes"

    def handles(self, value: object) -> bool:
        return isinstance(value, bytes | bytearray)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, bytes | bytearray)
        return bytes(value)

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        return data


class NumpyMaterializer:
    name = "numpy"

    def handles(self, value: object) -> bool:
        if isinstance(value, np.generic):
            return True
        return isinstance(value, np.ndarray) and value.dtype != object

    def dump(self, value: object) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(value), allow_pickle=False)
        return buffer.getvalue()

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        return array if ref.data_type == "numpy.ndarray" else array[()]


class PydanticMaterializer:
    name = "pydantic"

    def handles(self, value: object) -> bool:
        return isinstance(value, BaseModel)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, BaseModel)
        return value.model_dump_json().encode()

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        model = _import_type(ref.data_type)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConveyorError(f"{ref.data_type!r} is not a pydantic model")
        return model.model_validate_json(data)


class JsonMaterializer:
    """Dicts, lists, tuples, numbers, booleans and None; tuples come back as tuples."""

    name = "json"

    def handles(self, value: object) -> bool:
        if not isinstance(value, dict | list | tuple | int | float | bool | type(None)):
            return False
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError):
            return False
        return True

    def dump(self, value: object) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        value = json.loads(data)
        return tuple(value) if ref.data_type == "builtins.tuple" else value


class PickleMaterializer:
    """Anything picklable. Only used, and only read, where a step or caller opts in."""

    name = "pickle"

    def handles(self, value: object) -> bool:
        return True

    def dump(self, value: object) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def load(self, data: bytes, ref: ArtifactRef) -> object:
        return pickle.loads(data)


SAFE_MATERIALIZERS: Sequence[Materializer] = (
    StrMaterializer(),
    BytesMaterializer(),
    NumpyMaterializer(),
    PydanticMaterializer(),
    JsonMaterializer(),
)
PICKLE = PickleMaterializer()


class NoMaterializer(ConveyorError):
    """A value of a type that no enabled materializer writes."""


def choose(value: object, *, allow_pickle: bool, what: str) -> Materializer:
    """The materializer that writes ``value``; ``what`` names the output in the error."""
    for materializer in SAFE_MATERIALIZERS:
        if materializer.handles(value):
            return materializer
    if allow_pickle:
        return PICKLE
    raise NoMaterializer(
        f"{what} is a {type_name(value)}, which no materializer can store: return a "
        "JSON-compatible value, str, bytes, a numpy array or a pydantic model, or opt in "
        "to pickle with @step(allow_pickle=True)",
        retryable=False,
    )


def by_name(name: str, *, allow_pickle: bool) -> Materializer:
    """The materializer that wrote an artifact; refuses pickle unless allowed."""
    if name == PICKLE.name:
        if not allow_pickle:
            raise ConveyorError(
                "this artifact was pickled; loading it runs code, so pass allow_pickle=True "
                "(or @step(allow_pickle=True) on the consuming step) if you trust it",
                retryable=False,
            )
        return PICKLE
    for materializer in SAFE_MATERIALIZERS:
        if materializer.name == name:
            return materializer
    raise ConveyorError(f"unknown materializer {name!r}", retryable=False)
