"""Lists, tuples and dicts (string keys) whose items need different materializers: a tar of
one file per item, each written by its own materializer, and ``manifest.json`` saying which
(name, version and type per item). Items nest; pickle is never used for an item.

A container of JSON values alone is JSON (``builtin.JsonMaterializer``), not this.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from typing import Any

from conveyor.contracts import ArtifactRef, ConveyorError
from conveyor.workers import digests, materializers
from conveyor.workers.materializers.registry import MAX_CONTAINER_ITEMS as MAX_ITEMS

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20
FORMAT = 1


def _items(value: object) -> list[tuple[str | None, object]]:
    if isinstance(value, dict):
        return list(value.items())
    assert isinstance(value, list | tuple)
    return [(None, item) for item in value]


class Container:
    """A list, tuple or dict of values that other materializers store."""

    name = "container"
    version = "1"
    types = ("builtins.list", "builtins.tuple", "builtins.dict")

    def handles(self, value: object) -> bool:
        if not isinstance(value, list | tuple | dict) or len(value) > MAX_ITEMS:
            return False
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            return False
        return all(materializers.REGISTRY.find(item) is not None for _, item in _items(value))

    def save(self, value: object, path: str) -> str | None:
        kind = (
            "dict" if isinstance(value, dict) else "tuple" if isinstance(value, tuple) else "list"
        )
        entries: list[dict[str, Any]] = []
        folder = tempfile.mkdtemp(prefix="conveyor-container-")
        try:
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
                for index, (key, item) in enumerate(_items(value)):
                    chosen = materializers.choose(item, allow_pickle=False, what=f"item {index}")
                    file = os.path.join(folder, str(index))
                    chosen.save(item, file)
                    archive.add(file, arcname=str(index), recursive=False)
                    os.unlink(file)
                    entries.append(_entry(key, chosen, item))
                manifest = json.dumps({"format": FORMAT, "kind": kind, "items": entries})
                _add_bytes(archive, MANIFEST, manifest.encode())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        folder = tempfile.mkdtemp(prefix="conveyor-container-")
        try:
            with tarfile.open(path, "r:") as archive:
                manifest = _manifest(archive)
                loaded = [
                    _load_item(archive, entry, index, folder)
                    for index, entry in enumerate(manifest["items"])
                ]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if manifest["kind"] == "dict":
            return {
                entry["key"]: item for entry, item in zip(manifest["items"], loaded, strict=True)
            }
        return tuple(loaded) if manifest["kind"] == "tuple" else loaded


def _entry(key: str | None, chosen: Any, item: object) -> dict[str, Any]:
    return {
        "key": key,
        "materializer": chosen.name,
        "version": chosen.version,
        "data_type": materializers.type_name(item),
    }


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _broken(why: str) -> ConveyorError:
    return ConveyorError(f"the stored container is malformed: {why}", retryable=False)


def _manifest(archive: tarfile.TarFile) -> dict[str, Any]:
    try:
        member = archive.getmember(MANIFEST)
    except KeyError:
        raise _broken("no manifest") from None
    source = archive.extractfile(member) if member.isfile() else None
    if source is None or member.size > MAX_MANIFEST_BYTES:
        raise _broken("the manifest is not a small file")
    try:
        manifest = json.loads(source.read())
    except ValueError:
        raise _broken("the manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise _broken("the manifest is not a record")
    items = manifest.get("items")
    if manifest.get("kind") not in ("list", "tuple", "dict") or not isinstance(items, list):
        raise _broken("unknown kind or items")
    if len(items) > MAX_ITEMS or not all(isinstance(e, dict) for e in items):
        raise _broken(f"more than {MAX_ITEMS} items, or items that are not records")
    return manifest


def _load_item(archive: tarfile.TarFile, entry: dict[str, Any], index: int, folder: str) -> Any:
    name, data_type = entry.get("materializer"), entry.get("data_type")
    if not (isinstance(name, str) and isinstance(data_type, str)):
        raise _broken(f"item {index} names no materializer or type")
    try:
        member = archive.getmember(str(index))
    except KeyError:
        raise _broken(f"item {index} is missing") from None
    source = archive.extractfile(member) if member.isfile() else None
    if source is None:
        raise _broken(f"item {index} is not a file")
    file = os.path.join(folder, str(index))
    with source, open(file, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    digest, size = digests.of_file(file)
    ref = ArtifactRef(
        uri=f"container-item:{index}",
        digest=digest,
        size=size,
        materializer=name[:100],
        materializer_version=str(entry.get("version"))[:50],
        data_type=data_type[:500],
    )
    try:
        return materializers.by_name(ref.materializer, allow_pickle=False).load(file, ref)
    finally:
        os.unlink(file)
