"""Tables as Parquet: pandas DataFrames and Series and pyarrow Tables (``conveyor[pandas]``),
polars DataFrames (``conveyor[polars]``). Parquet holds data and schema, never code.

Imported only when such a value is stored or read, so the libraries load no earlier.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.contracts import ArtifactRef, ConveyorError

SERIES_COLUMN = "series"
SERIES_NAME_KEY = b"conveyor.series.name"


def _pandas() -> Any:
    import pandas

    return pandas


def _parquet() -> Any:
    import pyarrow.parquet

    return pyarrow.parquet


class PandasFrame:
    """A pandas DataFrame, with its index, as Parquet (pyarrow writes it). Column names must
    be strings, as Parquet's are."""

    name = "pandas.dataframe"
    version = "1"
    types = ("pandas.DataFrame", "pandas.core.frame.DataFrame")

    def handles(self, value: object) -> bool:
        return isinstance(value, _pandas().DataFrame)

    def save(self, value: object, path: str) -> str | None:
        frame: Any = value
        # Parquet names columns by strings; pandas would turn 1 into "1" and lose the type.
        odd = [c for c in frame.columns if not isinstance(c, str)]
        if odd:
            raise ConveyorError(
                f"a DataFrame Parquet cannot hold: column {str(odd[0])[:100]!r} is a "
                f"{type(odd[0]).__name__}, and Parquet names columns by strings; rename them, "
                "e.g. frame.columns = frame.columns.map(str)",
                retryable=False,
            )
        try:
            frame.to_parquet(path, engine="pyarrow")
        except (ValueError, TypeError) as exc:
            raise ConveyorError(f"a DataFrame Parquet cannot hold: {exc}", retryable=False) from exc
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        return _pandas().read_parquet(path, engine="pyarrow")


class PandasSeries:
    """A pandas Series as a one-column Parquet file; its name is kept in the metadata."""

    name = "pandas.series"
    version = "1"
    types = ("pandas.Series", "pandas.core.series.Series")

    def handles(self, value: object) -> bool:
        return isinstance(value, _pandas().Series)

    def save(self, value: object, path: str) -> str | None:
        import pyarrow

        series: Any = value
        table = pyarrow.Table.from_pandas(series.to_frame(name=SERIES_COLUMN))
        label = (
            series.name if isinstance(series.name, str | int | float | None) else str(series.name)
        )
        metadata = {**(table.schema.metadata or {}), SERIES_NAME_KEY: json.dumps(label).encode()}
        _parquet().write_table(table.replace_schema_metadata(metadata), path)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        table = _parquet().read_table(path)
        series = table.to_pandas()[SERIES_COLUMN]
        series.name = json.loads((table.schema.metadata or {}).get(SERIES_NAME_KEY, b"null"))
        return series


class ArrowTable:
    """A pyarrow Table as Parquet."""

    name = "pyarrow.table"
    version = "1"
    types = ("pyarrow.lib.Table",)

    def handles(self, value: object) -> bool:
        import pyarrow

        return isinstance(value, pyarrow.Table)

    def save(self, value: object, path: str) -> str | None:
        _parquet().write_table(value, path)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        return _parquet().read_table(path)


class PolarsFrame:
    """A polars DataFrame as Parquet (polars writes and reads it itself)."""

    name = "polars.dataframe"
    version = "1"
    types = ("polars.dataframe.frame.DataFrame",)

    def handles(self, value: object) -> bool:
        import polars

        return isinstance(value, polars.DataFrame)

    def save(self, value: object, path: str) -> str | None:
        value.write_parquet(path)  # type: ignore[attr-defined]
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        import polars

        return polars.read_parquet(path)
