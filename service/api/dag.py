"""A layered drawing of a run's DAG: pure geometry, rendered as SVG by the run page.

Each step goes in the layer after its deepest upstream step (layers run left to right).
Inside a layer, steps are ordered by the mean row of their upstream steps, which keeps
most edges short and uncrossed for the shapes pipelines usually have (chains, fan-out,
fan-in); ties keep the pipeline's own order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NODE_WIDTH = 180
NODE_HEIGHT = 56
GAP_X = 110
GAP_Y = 22
MARGIN = 12


@dataclass(frozen=True)
class NodeBox:
    """Where one step is drawn: its layer and row, and its box in SVG units."""

    name: str
    layer: int
    row: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class EdgePath:
    """An edge from an upstream step to a step, as an SVG path, and the middle of the path
    (where its label goes)."""

    source: str
    target: str
    d: str
    mid_x: float
    mid_y: float


@dataclass(frozen=True)
class DagLayout:
    nodes: list[NodeBox]
    edges: list[EdgePath]
    width: float
    height: float

    def node(self, name: str) -> NodeBox:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


Steps = Sequence[tuple[str, Sequence[str]]]


def layers(steps: Steps) -> dict[str, int]:
    """Each step's layer: 0 for a step without upstream, else one after its deepest upstream.

    Upstream names that are not steps are ignored; a cycle raises ``ValueError``.
    """
    names = {name for name, _ in steps}
    upstream = {name: {u for u in ups if u in names} for name, ups in steps}
    downstream: dict[str, list[str]] = {name: [] for name in upstream}
    for name, ups in upstream.items():
        for u in ups:
            downstream[u].append(name)
    # Kahn's algorithm, iteratively: a pipeline may be a chain thousands of steps long.
    waiting = {name: len(ups) for name, ups in upstream.items()}
    ready = [name for name, _ in steps if waiting[name] == 0]
    found = dict.fromkeys(ready, 0)
    while ready:
        name = ready.pop()
        for child in downstream[name]:
            found[child] = max(found.get(child, 0), found[name] + 1)
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    stuck = [name for name, _ in steps if waiting[name] > 0]
    if stuck:
        raise ValueError(f"the steps form a cycle through {', '.join(map(repr, stuck))}")
    return found


def layout(
    steps: Steps,
    *,
    node_width: float = NODE_WIDTH,
    node_height: float = NODE_HEIGHT,
    gap_x: float = GAP_X,
    gap_y: float = GAP_Y,
    margin: float = MARGIN,
) -> DagLayout:
    """Boxes and edges of the DAG of ``steps`` (name, upstream names), in pipeline order."""
    if not steps:
        return DagLayout([], [], 2 * margin, 2 * margin)
    depth = layers(steps)
    order = {name: i for i, (name, _) in enumerate(steps)}
    upstream = {name: [u for u in ups if u in depth] for name, ups in steps}
    by_layer: dict[int, list[str]] = {}
    for name, _ in steps:
        by_layer.setdefault(depth[name], []).append(name)
    row: dict[str, int] = {}
    for layer in sorted(by_layer):

        def weight(name: str) -> tuple[float, int]:
            ups = upstream[name]
            mean = sum(row[u] for u in ups) / len(ups) if ups else float(order[name])
            return mean, order[name]

        for i, name in enumerate(sorted(by_layer[layer], key=weight)):
            row[name] = i
    tallest = max(len(names) for names in by_layer.values())
    full_height = tallest * node_height + (tallest - 1) * gap_y
    boxes: dict[str, NodeBox] = {}
    for layer, names in by_layer.items():
        column_height = len(names) * node_height + (len(names) - 1) * gap_y
        top = margin + (full_height - column_height) / 2
        for name in names:
            boxes[name] = NodeBox(
                name=name,
                layer=layer,
                row=row[name],
                x=margin + layer * (node_width + gap_x),
                y=top + row[name] * (node_height + gap_y),
                width=node_width,
                height=node_height,
            )
    edges = [_edge(boxes[u], boxes[name]) for name, _ in steps for u in upstream[name]]
    layer_count = max(by_layer) + 1
    width = 2 * margin + layer_count * node_width + (layer_count - 1) * gap_x
    return DagLayout(
        nodes=[boxes[name] for name, _ in steps],
        edges=edges,
        width=width,
        height=2 * margin + full_height,
    )


def _edge(source: NodeBox, target: NodeBox) -> EdgePath:
    x1, y1 = source.x + source.width, source.y + source.height / 2
    x2, y2 = target.x, target.y + target.height / 2
    bend = (x2 - x1) / 2
    # The curve is symmetric about its middle, so its point at t = 1/2 is the chord's middle.
    return EdgePath(
        source=source.name,
        target=target.name,
        d=f"M {x1:g} {y1:g} C {x1 + bend:g} {y1:g}, {x2 - bend:g} {y2:g}, {x2:g} {y2:g}",
        mid_x=(x1 + x2) / 2,
        mid_y=(y1 + y2) / 2,
    )
