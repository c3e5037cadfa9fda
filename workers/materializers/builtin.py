"""The materializers that come with the base install: str, bytes, numpy arrays, pydantic
models, JSON values, and pickle (only where a step or caller opts in: unpickling runs code).
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import sys
from typing import Any, Protocol, TypeGuard, runtime_checkable

from pydantic import BaseModel

from conveyor.contracts import ArtifactRef, ConveyorError
from conveyor.workers import digests

HASH_ALONGSIDE_MIN = 4 << 20
"""Arrays from this size on are hashed from memory while they are written."""


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


@runtime_checkable
class InMemory(Protocol):
    """A materializer of small values, which are bytes in memory anyway: the store can hash
    them before anything is written (and write nothing when their address is taken)."""

    def dump(self, value: object) -> bytes:
        """The bytes of ``value``."""

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        """The value stored as ``data``."""


def in_memory(materializer: object) -> TypeGuard[InMemory]:
    """Whether ``materializer`` is an :class:`InMemory` one. Asked of its class once: an
    ``isinstance`` against a runtime-checkable protocol inspects its members each time,
    which cost a step's worker about 3% of its time (twice per step: load and save)."""
    cls = type(materializer)
    known = _IN_MEMORY.get(cls)
    if known is None:
        known = _IN_MEMORY[cls] = issubclass(cls, InMemory)
    return known


_IN_MEMORY: dict[type, bool] = {}


class _BytesBacked:
    """``save`` and ``load`` of an in-memory materializer, through its ``dump``/``parse``."""

    def dump(self, value: object) -> bytes:
        raise NotImplementedError

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        raise NotImplementedError

    def save(self, value: object, path: str) -> str | None:
        data = self.dump(value)
        with open(path, "wb") as handle:
            handle.write(data)
        return digests.of_bytes(data)

    def load(self, path: str, ref: ArtifactRef) -> object:
        with open(path, "rb") as handle:
            return self.parse(handle.read(), ref)


class StrMaterializer(_BytesBacked):
    name = "str"
    version = "1"

    def handles(self, value: object) -> bool:
        return isinstance(value, str)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, str)
        return value.encode()

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        return data.decode()


class BytesMaterializer(_BytesBacked):
    name = "bytes"
    version = "1"

    def handles(self, value: object) -> bool:
        return isinstance(value, bytes | bytearray)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, bytes | bytearray)
        return bytes(value)

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        return data


class NumpyMaterializer:
    """Arrays as ``.npy`` files: numpy writes and reads them straight from the file, so an
    array crosses the store without a second copy in memory."""

    name = "numpy"
    version = "1"

    def handles(self, value: object) -> bool:
        # No numpy value exists before numpy is imported: a step that makes none (and every
        # process that starts a run) does not pay the tenth of a second of importing it.
        if "numpy" not in sys.modules:
            return False
        import numpy as np

        if isinstance(value, np.generic):
            return True
        return isinstance(value, np.ndarray) and value.dtype != object

    def save(self, value: object, path: str) -> str | None:
        import numpy as np
        from numpy.lib import format as npy

        array = np.asarray(value)
        if array.nbytes < HASH_ALONGSIDE_MIN or not array.flags.c_contiguous:
            with open(path, "wb") as handle:
                np.save(handle, array, allow_pickle=False)
            return None
        # The bytes np.save would write (its header, then the data as is), hashed from memory
        # while they are written, so the store need not read the file back.
        header = io.BytesIO()
        npy.write_array_header_1_0(header, npy.header_data_from_array_1_0(array))
        head = header.getvalue()
        data = array.reshape(-1).view(np.uint8).data

        def write() -> None:
            with open(path, "wb") as handle:
                handle.write(head)
                array.tofile(handle)

        return digests.alongside(write, [head, data])

    def load(self, path: str, ref: ArtifactRef) -> object:
        import numpy as np

        with open(path, "rb") as handle:
            array = np.load(handle, allow_pickle=False)
        return array if ref.data_type == "numpy.ndarray" else array[()]


class PydanticMaterializer(_BytesBacked):
    name = "pydantic"
    version = "1"

    def handles(self, value: object) -> bool:
        return isinstance(value, BaseModel)

    def dump(self, value: object) -> bytes:
        assert isinstance(value, BaseModel)
        return value.model_dump_json().encode()

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        model = _import_type(ref.data_type)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConveyorError(f"{ref.data_type!r} is not a pydantic model")
        return model.model_validate_json(data)


_JSON_SCALARS = frozenset({bool, float, type(None)})
_INT_BOUND = 1 << 64
"""Ints below this are JSON; a huge one may exceed Python's int-to-text digit limit."""


class JsonMaterializer(_BytesBacked):
    """Dicts, lists, tuples, numbers, booleans and None; tuples come back as tuples."""

    name = "json"
    version = "1"

    def handles(self, value: object) -> bool:
        # Scalars that are always JSON, without encoding them once to find out.
        if type(value) in _JSON_SCALARS:
            return True
        if type(value) is int and -_INT_BOUND < value < _INT_BOUND:
            return True
        if not isinstance(value, dict | list | tuple | int | float | bool | type(None)):
            return False
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError):
            return False
        return True

    def dump(self, value: object) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def parse(self, data: bytes, ref: ArtifactRef) -> object:
        value = json.loads(data)
        return tuple(value) if ref.data_type == "builtins.tuple" else value


class PickleMaterializer:
    """Anything picklable. Only used, and only read, where a step or caller opts in."""

    name = "pickle"
    version = "1"

    def handles(self, value: object) -> bool:
        return True

    def save(self, value: object, path: str) -> str | None:
        with open(path, "wb") as handle:
            pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        with open(path, "rb") as handle:
            return pickle.load(handle)
