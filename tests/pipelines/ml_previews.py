"""A pipeline whose outputs the artifact page previews: a DataFrame with markup in its
names and cells, a long 1-D array and a 2-D array."""

from __future__ import annotations

import numpy as np
import pandas as pd

from conveyor import pipeline, step

HOSTILE_COLUMN = "<b>name</b>"
HOSTILE_CELL = "<script>alert('cell')</script>"


@step
def table() -> pd.DataFrame:
    return pd.DataFrame(
        {HOSTILE_COLUMN: [HOSTILE_CELL, "plain", "x" * 500], "score": [0.5, 1.25, -3.0]}
    )


@step
def curve() -> np.ndarray:
    return np.sin(np.linspace(0, 20, 5000))


@step
def grid() -> np.ndarray:
    return np.arange(100 * 80, dtype=np.float32).reshape(100, 80)


@step
def long_text() -> str:
    return "x" * 70_000


@pipeline
def previews() -> None:
    table()
    curve()
    grid()
    long_text()
