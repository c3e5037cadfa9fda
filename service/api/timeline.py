"""A run's steps on a time axis: pure geometry, drawn as bars by the run page.

Each step that started gets a bar from its start to its end (or to now, while it runs),
in percent of the run's span, so the page can draw it at any width without measuring.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel

MIN_WIDTH_PCT = 0.6
"""The narrowest bar drawn, so that a step of a few milliseconds in a long run still shows."""


class Bar(BaseModel):
    """Where one step's bar lies on the run's axis, in percent of the axis."""

    offset_pct: float
    width_pct: float
    going: bool


class Timeline(BaseModel):
    """The run's span in seconds and a bar per step (``None``: the step has not started)."""

    span_s: float
    bars: list[Bar | None]


Interval = tuple[datetime | None, datetime | None]


def timeline(origin: datetime | None, end: datetime, steps: Sequence[Interval]) -> Timeline:
    """Bars of ``steps`` (start, finish) on the axis from ``origin`` to ``end``.

    ``origin`` is when the run started (``None``: the earliest step start); a step without
    a finish is going, and reaches ``end``. Times outside the axis are clipped to it.
    """
    starts = [start for start, _ in steps if start is not None]
    if origin is None:
        origin = min(starts, default=end)
    latest = max([end, *(f for _, f in steps if f is not None)])
    span_s = max((latest - origin).total_seconds(), 1e-3)

    def pct(moment: datetime) -> float:
        return min(max((moment - origin).total_seconds() / span_s * 100, 0.0), 100.0)

    bars: list[Bar | None] = []
    for start, finish in steps:
        if start is None:
            bars.append(None)
            continue
        left = pct(start)
        right = pct(finish if finish is not None else latest)
        width = max(right - left, MIN_WIDTH_PCT)
        left = min(left, 100 - width)
        bars.append(Bar(offset_pct=round(left, 3), width_pct=round(width, 3), going=finish is None))
    return Timeline(span_s=span_s, bars=bars)
