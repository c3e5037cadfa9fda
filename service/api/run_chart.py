"""Run durations and outcomes over time: pure geometry of the bar chart on the stack and
pipeline pages.

One bar per run, oldest on the left, its height the run's duration on a scale from 0 to a
round number (1, 2 or 5 times a power of ten), its colour the run's status. The SVG is
drawn in a box of ``BAR_PITCH`` units per run and ``HEIGHT`` units high, stretched to the
page's width, so the chart fits any screen; its labels are text beside it, not inside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from conveyor.contracts import RunRecord, RunStatus

CHART_RUNS = 60
"""How many of the latest runs the chart shows."""
HEIGHT = 100.0
BAR_PITCH = 10.0
BAR_WIDTH = 7.0
MIN_SLOTS = 24
"""The chart has room for at least this many runs, so that a few runs are not drawn wide."""
STUB = 2.0
"""The height of a run without a duration (it never started), so that it still shows."""


@dataclass(frozen=True)
class ChartBar:
    run_id: str
    pipeline: str
    status: RunStatus
    created: datetime
    duration_s: float | None
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class RunChart:
    bars: list[ChartBar]
    width: float
    height: float
    scale_s: float
    """The duration at the top of the chart."""
    counts: dict[RunStatus, int]


def round_up(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power


def run_chart(runs: Sequence[RunRecord], durations: Sequence[float | None]) -> RunChart:
    """The chart of ``runs`` (newest first, as listed) and their ``durations`` (seconds,
    ``None`` for a run that never started; a running run's time so far)."""
    pairs = list(zip(runs, durations, strict=True))[:CHART_RUNS][::-1]
    scale = round_up(max((d for _, d in pairs if d is not None), default=1.0))
    bars = []
    for i, (run, duration) in enumerate(pairs):
        height = STUB if duration is None else max(duration / scale * HEIGHT, STUB / 2)
        bars.append(
            ChartBar(
                run_id=run.id,
                pipeline=run.pipeline,
                status=run.status,
                created=run.created,
                duration_s=duration,
                x=i * BAR_PITCH + (BAR_PITCH - BAR_WIDTH) / 2,
                y=HEIGHT - height,
                width=BAR_WIDTH,
                height=height,
            )
        )
    counts: dict[RunStatus, int] = {}
    for run, _ in pairs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return RunChart(
        bars=bars,
        width=max(len(pairs), MIN_SLOTS) * BAR_PITCH,
        height=HEIGHT,
        scale_s=scale,
        counts=counts,
    )
