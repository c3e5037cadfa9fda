"""Reading an artifact's bytes for a download or a preview, never outside its store.

The file is located through the artifact store of the stack the run ran on, whose
``path_of`` refuses any URI that resolves (symlinks included) outside the store's root; the
bytes are checked against the recorded size and sha256 before anything is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from conveyor.contracts import ArtifactRecord, ArtifactRef, NotFoundError
from conveyor.service.api.errors import Forbidden
from conveyor.service.api.schemas import ArtifactPreview
from conveyor.service.context import Services
from conveyor.workers.artifact_store_local import ArtifactUnreadable
from conveyor.workers.flavors import run_artifact_store

PREVIEW_MAX_BYTES = 64 * 1024
PREVIEW_MAX_CHARS = 20_000
CHUNK = 1 << 20
SUFFIX = {"json": ".json", "str": ".txt", "numpy": ".npy", "pydantic": ".json", "pickle": ".pkl"}


@dataclass(frozen=True)
class ArtifactFile:
    """A verified artifact file and the name to offer for it."""

    record: ArtifactRecord
    path: Path

    @property
    def filename(self) -> str:
        suffix = SUFFIX.get(self.record.ref.materializer, ".bin")
        return f"{self.record.step_name}.{self.record.output_name}{suffix}"


def _verify(path: Path, ref: ArtifactRef) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise NotFoundError(f"the bytes of {ref.uri} are missing from the artifact store") from None
    if size != ref.size:
        raise ArtifactUnreadable(f"artifact {ref.uri} is corrupted: {size} bytes, not {ref.size}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != ref.sha256:
        raise ArtifactUnreadable(f"artifact {ref.uri} is corrupted: its sha256 does not match")


def _locate(snapshot: dict[str, object], ref: ArtifactRef) -> Path:
    store = run_artifact_store(snapshot)
    try:
        path = Path(store.path_of(ref.uri))
    except ArtifactUnreadable as exc:
        raise Forbidden(f"refused: {exc}") from None
    _verify(path, ref)
    return path


async def open_artifact(services: Services, artifact_id: str) -> ArtifactFile:
    """The artifact's file inside its store, its bytes verified."""
    record = await services.runs.get_artifact(artifact_id)
    run = await services.runs.get_run(record.run_id)
    path = await asyncio.to_thread(_locate, run.stack_snapshot, record.ref)
    return ArtifactFile(record, path)


def _clip(text: str) -> tuple[str, str | None]:
    if len(text) <= PREVIEW_MAX_CHARS:
        return text, None
    return text[:PREVIEW_MAX_CHARS], f"shortened to the first {PREVIEW_MAX_CHARS} characters"


PreviewKind = Literal["json", "text", "array", "none"]


def _made(
    record: ArtifactRecord, kind: PreviewKind, text: str | None = None, note: str | None = None
) -> ArtifactPreview:
    ref = record.ref
    return ArtifactPreview(
        artifact_id=record.id,
        materializer=ref.materializer,
        data_type=ref.data_type,
        size=ref.size,
        kind=kind,
        text=text,
        note=note,
    )


def _render(record: ArtifactRecord, data: bytes) -> ArtifactPreview:
    materializer = record.ref.materializer
    if materializer in ("json", "pydantic"):
        return _made(record, "json", *_clip(json.dumps(json.loads(data), indent=2)))
    if materializer == "str":
        return _made(record, "text", *_clip(data.decode("utf-8", errors="replace")))
    if materializer == "numpy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        text, _ = _clip(np.array2string(array, threshold=200, edgeitems=3))
        return _made(record, "array", text, f"shape {array.shape}, dtype {array.dtype}")
    return _made(record, "none", note=f"{materializer} data is not previewed")


def _preview(record: ArtifactRecord, path: Path) -> ArtifactPreview:
    return _render(record, path.read_bytes())


async def preview_artifact(services: Services, artifact_id: str) -> ArtifactPreview:
    """A look at a small JSON, str or numpy value; never unpickles, never reads big files."""
    record = await services.runs.get_artifact(artifact_id)
    if record.ref.materializer == "pickle":
        return _made(record, "none", note="pickled: not previewed, since loading it runs code")
    if record.ref.size > PREVIEW_MAX_BYTES:
        return _made(
            record,
            "none",
            note=f"{record.ref.size} bytes is too large to preview (the limit is "
            f"{PREVIEW_MAX_BYTES // 1024} KiB); download it",
        )
    located = await open_artifact(services, record.id)
    return await asyncio.to_thread(_preview, record, located.path)
