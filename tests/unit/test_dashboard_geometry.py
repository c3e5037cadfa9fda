"""The run page's timeline, the runs chart of the stack and pipeline pages, and the DAG's edge
labels: pure functions, checked directly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.contracts import PipelineSpec, RunRecord, RunStatus
from conveyor.service.api.dag import layout
from conveyor.service.api.run_chart import CHART_RUNS, HEIGHT, MIN_SLOTS, round_up, run_chart
from conveyor.service.api.timeline import MIN_WIDTH_PCT, timeline
from conveyor.service.api.views import edge_labels

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_bars_sit_where_each_step_ran_in_percent_of_the_run() -> None:
    axis = timeline(at(0), at(10), [(at(0), at(2)), (at(2), at(10)), (None, None)])
    assert axis.span_s == 10
    first, second, waiting = axis.bars
    assert first is not None and (first.offset_pct, first.width_pct) == (0, 20)
    assert second is not None and (second.offset_pct, second.width_pct) == (20, 80)
    assert not first.going and waiting is None


def test_a_running_step_reaches_now_and_a_tiny_one_still_shows() -> None:
    axis = timeline(at(0), at(100), [(at(50), None), (at(99.999), at(100))])
    running, tiny = axis.bars
    assert running is not None and running.going
    assert (running.offset_pct, running.width_pct) == (50, 50)
    assert tiny is not None and tiny.width_pct == MIN_WIDTH_PCT
    assert tiny.offset_pct + tiny.width_pct <= 100


def test_without_a_run_start_the_axis_starts_at_the_first_step() -> None:
    axis = timeline(None, at(8), [(at(4), at(6)), (at(6), at(8))])
    assert axis.span_s == 4
    assert [b.offset_pct for b in axis.bars if b] == [0, 50]
    # A step recorded as finishing after the run's end stretches the axis, never past 100 %.
    late = timeline(at(0), at(4), [(at(0), at(8))])
    assert late.span_s == 8 and late.bars[0] is not None and late.bars[0].width_pct == 100


@pytest.mark.parametrize(
    ("value", "rounded"), [(0.0, 1.0), (0.3, 0.5), (1.0, 1.0), (1.2, 2.0), (7, 10), (31, 50)]
)
def test_the_chart_scale_is_a_round_number(value: float, rounded: float) -> None:
    assert round_up(value) == pytest.approx(rounded)


def _run(i: int, status: RunStatus) -> RunRecord:
    return RunRecord(
        id=f"{i:032x}",
        pipeline="p",
        stack_id="s",
        stack_name="default",
        status=status,
        created=at(i),
    )


def test_the_chart_draws_runs_oldest_first_with_height_by_duration() -> None:
    newest_first = [
        _run(3, RunStatus.FAILED),
        _run(2, RunStatus.COMPLETED),
        _run(1, RunStatus.PENDING),
    ]
    chart = run_chart(newest_first, [1.0, 2.0, None])
    assert [b.run_id for b in chart.bars] == [r.id for r in reversed(newest_first)]
    assert chart.scale_s == 2.0
    pending, completed, failed = chart.bars
    assert completed.height == HEIGHT and completed.y == 0
    assert failed.height == HEIGHT / 2 and failed.y == HEIGHT / 2
    assert 0 < pending.height < 5  # never started: a stub, still visible and clickable
    assert pending.x < completed.x < failed.x
    assert chart.width == MIN_SLOTS * 10
    assert chart.counts == {RunStatus.FAILED: 1, RunStatus.COMPLETED: 1, RunStatus.PENDING: 1}


def test_the_chart_keeps_only_the_latest_runs() -> None:
    runs = [_run(i, RunStatus.COMPLETED) for i in range(CHART_RUNS + 10, 0, -1)]
    chart = run_chart(runs, [1.0] * len(runs))
    assert len(chart.bars) == CHART_RUNS
    assert chart.bars[-1].run_id == runs[0].id


def test_edge_labels_name_the_outputs_each_step_reads() -> None:
    spec = PipelineSpec.model_validate(
        {
            "name": "p",
            "steps": [
                {"name": "split", "ref": "m:split", "outputs": ["output_0", "output_1"]},
                {
                    "name": "train",
                    "ref": "m:train",
                    "inputs": {
                        "x": {"step": "split", "output": "output_0"},
                        "y": {"step": "split", "output": "output_1"},
                    },
                    "outputs": ["output"],
                },
                {
                    "name": "report",
                    "ref": "m:report",
                    "inputs": {
                        "parts": [
                            {"step": "split", "output": "output_1"},
                            {"step": "train", "output": "output"},
                        ]
                    },
                },
            ],
        }
    )
    assert edge_labels(spec) == {
        ("split", "train"): "output_0, output_1",
        ("split", "report"): "output_1",
        ("train", "report"): "output",
    }
    graph = layout([(s.name, s.upstream) for s in spec.steps])
    for edge in graph.edges:
        source, target = graph.node(edge.source), graph.node(edge.target)
        assert source.x + source.width < edge.mid_x < target.x
