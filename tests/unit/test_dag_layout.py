"""The layered layout of a run's DAG (pure geometry, drawn as SVG by the run page)."""

from __future__ import annotations

import itertools

import pytest

from conveyor.service.api.dag import NodeBox, layers, layout


def _overlap(a: NodeBox, b: NodeBox) -> bool:
    return not (
        a.x + a.width <= b.x
        or b.x + b.width <= a.x
        or a.y + a.height <= b.y
        or b.y + b.height <= a.y
    )


def test_a_chain_is_one_row_left_to_right() -> None:
    graph = layout([("a", []), ("b", ["a"]), ("c", ["b"])])
    a, b, c = (graph.node(n) for n in "abc")
    assert [a.layer, b.layer, c.layer] == [0, 1, 2]
    assert a.y == b.y == c.y
    assert a.x < b.x < c.x
    assert [(e.source, e.target) for e in graph.edges] == [("a", "b"), ("b", "c")]


def test_a_diamond_puts_the_branches_in_one_layer_on_two_rows() -> None:
    graph = layout(
        [("load", []), ("left", ["load"]), ("right", ["load"]), ("join", ["left", "right"])]
    )
    left, right, join = graph.node("left"), graph.node("right"), graph.node("join")
    assert left.layer == right.layer == 1 and join.layer == 2
    assert {left.row, right.row} == {0, 1}
    # The join sits between its two inputs, the source between its two outputs.
    assert min(left.y, right.y) < join.y < max(left.y, right.y)
    assert min(left.y, right.y) < graph.node("load").y < max(left.y, right.y)
    assert len(graph.edges) == 4


def test_a_step_goes_one_layer_after_its_deepest_upstream() -> None:
    found = layers([("a", []), ("b", ["a"]), ("c", ["b"]), ("d", ["a", "c"]), ("e", [])])
    assert found == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 0}


def test_steps_in_any_order_and_unknown_upstreams() -> None:
    found = layers([("late", ["early", "missing"]), ("early", [])])
    assert found == {"late": 1, "early": 0}


def test_a_cycle_is_refused() -> None:
    with pytest.raises(ValueError, match="cycle"):
        layers([("a", ["b"]), ("b", ["a"])])
    with pytest.raises(ValueError, match="cycle"):
        layers([("a", ["a"])])


def test_boxes_never_overlap_and_fit_the_canvas() -> None:
    steps = (
        [("src", [])]
        + [(f"s{i}", ["src"]) for i in range(6)]
        + [
            ("sink", [f"s{i}" for i in range(6)]),
            ("other", []),
        ]
    )
    graph = layout(steps)
    assert [n.name for n in graph.nodes] == [name for name, _ in steps]
    for a, b in itertools.combinations(graph.nodes, 2):
        assert not _overlap(a, b), (a, b)
    for n in graph.nodes:
        assert n.x >= 0 and n.x + n.width <= graph.width
        assert n.y >= 0 and n.y + n.height <= graph.height
    assert all(e.d.startswith("M ") for e in graph.edges)


def test_rows_follow_the_upstream_order_to_avoid_crossings() -> None:
    # b2 feeds c1 and b1 feeds c2: the next layer is reordered to match, so edges do not cross.
    graph = layout([("b1", []), ("b2", []), ("c1", ["b2"]), ("c2", ["b1"])])
    assert graph.node("c2").row < graph.node("c1").row


def test_a_long_chain_does_not_recurse() -> None:
    steps = [("s0", [])] + [(f"s{i}", [f"s{i - 1}"]) for i in range(1, 5000)]
    assert layers(steps)["s4999"] == 4999


def test_empty() -> None:
    graph = layout([])
    assert graph.nodes == [] and graph.edges == []
