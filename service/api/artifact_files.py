"""Reading an artifact's bytes for a download or a preview, never outside its store.

The bytes are read through the artifact store of the stack the run ran on, whose ``get``
refuses any URI outside the store (symlinks included) and verifies the digest before the
first byte is sent. A download streams: a local store's file, or an object store's object
fetched into a temporary file, is sent in chunks and never held whole in memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi.responses import StreamingResponse

from conveyor.contracts import ArtifactRecord, ArtifactRef, OutsideStore, RunRecord
from conveyor.service.api.artifact_previews import parquet_table, plot, plottable
from conveyor.service.api.errors import Forbidden
from conveyor.service.api.schemas import ArtifactPreview
from conveyor.service.context import Services
from conveyor.workers.flavors import run_artifact_store

T = TypeVar("T")
PREVIEW_MAX_BYTES = 64 * 1024
PREVIEW_MAX_CHARS = 20_000
TABLE_MAX_BYTES = 64 << 20
"""A table's file is fetched through the store (which verifies its whole digest) up to this
size; its footer and first rows are all that is parsed."""
PLOT_MAX_BYTES = 16 << 20
CHUNK = 1 << 20
TABLES = ("pandas.dataframe", "pandas.series", "pyarrow.table", "polars.dataframe")
SUFFIX = {
    "json": ".json",
    "str": ".txt",
    "numpy": ".npy",
    "pydantic": ".json",
    "pickle": ".pkl",
    "sklearn.skops": ".skops",
    "torch.tensor": ".safetensors",
    "torch.state_dict": ".safetensors",
    "path": ".tar",
    "container": ".tar",
    **dict.fromkeys(TABLES, ".parquet"),
}


@dataclass(frozen=True)
class ArtifactFile:
    """An open, verified artifact file and the name to offer for it."""

    record: ArtifactRecord
    handle: BinaryIO

    @property
    def filename(self) -> str:
        suffix = SUFFIX.get(self.record.ref.materializer, ".bin")
        return f"{self.record.step_name}.{self.record.output_name}{suffix}"

    def chunks(self) -> Iterator[bytes]:
        """The bytes in chunks; closes the file at the end (or when the client goes away)."""
        with self.handle:
            while chunk := self.handle.read(CHUNK):
                yield chunk


def _open(snapshot: dict[str, object], record: ArtifactRecord) -> BinaryIO:
    store = run_artifact_store(snapshot)
    ref = record.ref
    try:
        # The open handle outlives a temporary download file, which is unlinked on return.
        handle: BinaryIO = store.get(ref.uri, ref.digest, lambda path: open(path, "rb"))  # noqa: SIM115
    except OutsideStore as exc:
        raise Forbidden(f"refused: {exc}") from None
    return handle


async def open_artifact(services: Services, artifact_id: str) -> ArtifactFile:
    """The artifact's bytes, verified, open for reading."""
    record = await services.artifacts.get_artifact(artifact_id)
    run = await services.runs.get_run(record.run_id)
    handle = await asyncio.to_thread(_open, run.stack_snapshot, record)
    return ArtifactFile(record, handle)


def _clip(text: str) -> tuple[str, str | None]:
    if len(text) <= PREVIEW_MAX_CHARS:
        return text, None
    return text[:PREVIEW_MAX_CHARS], f"shortened to the first {PREVIEW_MAX_CHARS} characters"


PreviewKind = Literal["json", "text", "array", "table", "none"]


def _made(
    record: ArtifactRecord,
    kind: PreviewKind,
    text: str | None = None,
    note: str | None = None,
    **drawn: Any,
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
        **drawn,
    )


def _render(record: ArtifactRecord, data: bytes) -> ArtifactPreview:
    materializer = record.ref.materializer
    if materializer in ("json", "pydantic"):
        return _made(record, "json", *_clip(json.dumps(json.loads(data), indent=2)))
    if materializer == "str":
        return _made(record, "text", *_clip(data.decode("utf-8", errors="replace")))
    return _made(record, "none", note=f"{materializer} data is not previewed")


def _array(record: ArtifactRecord, path: str) -> ArtifactPreview:
    """Summarized as text (numpy shortens it) and, if 1-D or 2-D and numeric, drawn."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    text, _ = _clip(np.array2string(array, threshold=200, edgeitems=3))
    drawn = plot(array) if plottable(array) else None
    return _made(record, "array", text, f"shape {array.shape}, dtype {array.dtype}", plot=drawn)


def _table(record: ArtifactRecord, path: str) -> ArtifactPreview:
    try:
        table = parquet_table(path)
    except ImportError:
        return _made(
            record, "none", note="install conveyor[pandas] on the server to preview tables"
        )
    rows = len(table.rows)
    shown = f"; the first {rows} rows" if rows < table.rows_total else ""
    note = f"{table.rows_total} rows × {table.columns_total} columns{shown}"
    return _made(record, "table", note=note, table=table)


def _through_store(
    snapshot: dict[str, object], record: ArtifactRecord, read: Callable[[str], T]
) -> T:
    store = run_artifact_store(snapshot)
    try:
        return store.get(record.ref.uri, record.ref.digest, read)
    except OutsideStore as exc:
        raise Forbidden(f"refused: {exc}") from None


def _preview(located: ArtifactFile) -> ArtifactPreview:
    with located.handle:
        return _render(located.record, located.handle.read(PREVIEW_MAX_BYTES + 1))


async def preview_artifact(services: Services, artifact_id: str) -> ArtifactPreview:
    """A look at a small JSON, str or numpy value; never unpickles, never reads big files."""
    record = await services.artifacts.get_artifact(artifact_id)
    materializer, size = record.ref.materializer, record.ref.size
    if materializer == "pickle":
        return _made(record, "none", note="pickled: not previewed, since loading it runs code")
    reader = {"numpy": (_array, PLOT_MAX_BYTES), **dict.fromkeys(TABLES, (_table, TABLE_MAX_BYTES))}
    if materializer in reader and size <= reader[materializer][1]:
        read = reader[materializer][0]
        run = await services.runs.get_run(record.run_id)
        return await asyncio.to_thread(
            _through_store, run.stack_snapshot, record, lambda path: read(record, path)
        )
    if record.ref.size > PREVIEW_MAX_BYTES:
        return _made(
            record,
            "none",
            note=f"{record.ref.size} bytes is too large to preview (the limit is "
            f"{PREVIEW_MAX_BYTES // 1024} KiB); download it",
        )
    located = await open_artifact(services, record.id)
    return await asyncio.to_thread(_preview, located)


def _read_logs(snapshot: dict[str, object], ref: ArtifactRef) -> str:
    store = run_artifact_store(snapshot)
    try:
        data = store.get_bytes(ref.uri, ref.digest)
    except OutsideStore as exc:
        raise Forbidden(f"refused: {exc}") from None
    return data.decode("utf-8", errors="replace")


async def read_logs(run: RunRecord, ref: ArtifactRef) -> str:
    """What a step printed and logged (a worker keeps at most the last million characters),
    read through the run's artifact store."""
    return await asyncio.to_thread(_read_logs, run.stack_snapshot, ref)


def download_response(found: ArtifactFile) -> StreamingResponse:
    """A response that streams the artifact's bytes as a file named after its step."""
    quoted = quote(found.filename)
    return StreamingResponse(
        found.chunks(),
        media_type="application/octet-stream",
        headers={
            "content-disposition": f"attachment; filename*=utf-8''{quoted}",
            "content-length": str(found.record.ref.size),
        },
    )
