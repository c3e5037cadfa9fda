"""Looks at tables and numeric arrays for the artifact page: a Parquet file's shape, column
types and first rows (read from its footer and first batch, never whole), and 1-D or 2-D
numeric arrays drawn as a line or a heat map.

Pure functions of a file or an array; every output is bounded (rows, columns, characters,
points, cells) and is data, which the template escapes and draws as inline SVG.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np

from conveyor.service.api.schemas import PlotCell, PreviewColumn, PreviewPlot, PreviewTable

MAX_ROWS = 10
MAX_COLUMNS = 30
MAX_CELL_CHARS = 80
LINE_POINTS = 600
HEATMAP_CELLS = 40
PLOT_WIDTH = 600.0
PLOT_HEIGHT = 200.0
RAMP = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
"""A perceptual ramp (viridis's stops), low to high."""


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def _index_columns(schema: Any) -> set[str]:
    raw = (schema.metadata or {}).get(b"pandas")
    if raw is None:
        return set()
    try:
        named = json.loads(raw).get("index_columns", [])
    except (ValueError, AttributeError):
        return set()
    return {name for name in named if isinstance(name, str)}


def parquet_table(path: str) -> PreviewTable:
    """The shape, column types and first rows of the Parquet file at ``path``."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        schema = parquet.schema_arrow
        index = _index_columns(schema)
        names = schema.names[:MAX_COLUMNS]
        columns = [
            PreviewColumn(
                name=_cell(name), dtype=_cell(schema.field(name).type), index=name in index
            )
            for name in names
        ]
        rows: list[list[str]] = []
        if parquet.metadata.num_rows:
            batch = next(parquet.iter_batches(batch_size=MAX_ROWS, columns=names))
            values = batch.to_pydict()
            rows = [[_cell(values[n][i]) for n in names] for i in range(batch.num_rows)]
        return PreviewTable(
            rows_total=parquet.metadata.num_rows,
            columns_total=len(schema.names) - len(index),
            columns=columns,
            rows=rows,
        )


def plottable(array: np.ndarray[Any, Any]) -> bool:
    """A 1-D or 2-D array of real numbers with at least two values."""
    kind = array.dtype.kind
    return array.ndim in (1, 2) and kind in "iufb" and array.size >= 2


def plot(array: np.ndarray[Any, Any]) -> PreviewPlot:
    """A line for a 1-D array, a heat map for a 2-D one."""
    values = np.asarray(array, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if values.ndim == 1:
        return PreviewPlot(
            kind="line",
            shape=list(values.shape),
            low=low,
            high=high,
            points=_line(values, low, high),
            width=PLOT_WIDTH,
            height=PLOT_HEIGHT,
        )
    return PreviewPlot(
        kind="heatmap",
        shape=list(values.shape),
        low=low,
        high=high,
        cells=_heatmap(values, low, high),
        width=PLOT_WIDTH,
        height=PLOT_HEIGHT,
    )


def _line(values: np.ndarray[Any, Any], low: float, high: float) -> str:
    """SVG polyline points; more values than ``LINE_POINTS`` are bucketed, keeping each
    bucket's lowest and highest so that spikes stay visible. Non-finite values are left out."""
    n = values.size
    if n > LINE_POINTS:
        edges = np.linspace(0, n, LINE_POINTS // 2 + 1).astype(int)
        xs: list[float] = []
        ys: list[float] = []
        for start, end in itertools.pairwise(edges):
            chunk = np.where(np.isfinite(values[start:end]), values[start:end], np.nan)
            if np.isnan(chunk).all():
                continue
            # In the order they occur, so that a falling stretch does not zigzag.
            for at in sorted({int(np.nanargmin(chunk)), int(np.nanargmax(chunk))}):
                xs.append(float(start + at))
                ys.append(float(chunk[at]))
    else:
        keep = np.isfinite(values)
        xs = [float(i) for i in np.flatnonzero(keep)]
        ys = [float(v) for v in values[keep]]
    span = high - low or 1.0
    last = max(n - 1, 1)
    return " ".join(
        f"{x / last * PLOT_WIDTH:.1f},{PLOT_HEIGHT - (y - low) / span * PLOT_HEIGHT:.1f}"
        for x, y in zip(xs, ys, strict=True)
    )


def _heatmap(values: np.ndarray[Any, Any], low: float, high: float) -> list[PlotCell]:
    rows, cols = values.shape
    row_edges = np.linspace(0, rows, min(rows, HEATMAP_CELLS) + 1).astype(int)
    col_edges = np.linspace(0, cols, min(cols, HEATMAP_CELLS) + 1).astype(int)
    width = PLOT_WIDTH / (len(col_edges) - 1)
    height = PLOT_HEIGHT / (len(row_edges) - 1)
    span = high - low or 1.0
    cells: list[PlotCell] = []
    for i in range(len(row_edges) - 1):
        for j in range(len(col_edges) - 1):
            block = values[row_edges[i] : row_edges[i + 1], col_edges[j] : col_edges[j + 1]]
            block = block[np.isfinite(block)]
            fill = _color((float(block.mean()) - low) / span) if block.size else "#cccccc"
            cells.append(PlotCell(x=j * width, y=i * height, w=width, h=height, fill=fill))
    return cells


def _color(t: float) -> str:
    """``t`` in [0, 1] on the ramp, as #rrggbb."""
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    position = t * (len(RAMP) - 1)
    i = min(int(position), len(RAMP) - 2)
    frac = position - i
    rgb = (round(a + (b - a) * frac) for a, b in zip(RAMP[i], RAMP[i + 1], strict=True))
    return "#" + "".join(f"{c:02x}" for c in rgb)
