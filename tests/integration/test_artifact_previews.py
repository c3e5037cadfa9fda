"""The artifact page previews a DataFrame (shape, column types, first rows, escaped) and draws
1-D and 2-D numeric arrays as inline SVG, bounded however long the array."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from markupsafe import escape

from conveyor.service.api import artifact_previews
from tests.integration.api_helpers import ROOT, serving, submit, wait_status
from tests.pipelines.ml_previews import HOSTILE_CELL, HOSTILE_COLUMN

PREVIEWS = f"{ROOT / 'tests' / 'pipelines' / 'ml_previews.py'}:previews"


@pytest.fixture
async def api(home: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(home) as (_, client):
        yield client


async def artifacts_of_a_run(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    run = await submit(api, PREVIEWS)
    assert (await wait_status(api, run["id"]))["status"] == "completed"
    found = (await api.get("/api/artifacts", params={"run_id": run["id"]})).json()
    return {a["step_name"]: a for a in found["items"]}


async def test_a_dataframe_is_previewed_as_an_escaped_table(api: httpx.AsyncClient) -> None:
    artifact = (await artifacts_of_a_run(api))["table"]
    page = (await api.get(f"/artifacts/{artifact['id']}")).text
    assert 'id="preview-table"' in page
    assert "3 rows × 2 columns" in page
    for text in (HOSTILE_COLUMN, HOSTILE_CELL):
        assert text not in page and str(escape(text)) in page
    assert ">double<" in page and re.search(r">(large_)?string<", page)
    assert "x" * 79 + "…" in page and "x" * 81 not in page  # a long cell is cut

    preview = (await api.get(f"/api/artifacts/{artifact['id']}/preview")).json()
    assert preview["kind"] == "table"
    assert preview["table"]["rows_total"] == 3
    assert [c["name"] for c in preview["table"]["columns"]] == [HOSTILE_COLUMN, "score"]
    assert preview["table"]["rows"][0] == [HOSTILE_CELL, "0.5"]


async def test_numeric_arrays_are_drawn_as_bounded_inline_svg(api: httpx.AsyncClient) -> None:
    artifacts = await artifacts_of_a_run(api)
    line = (await api.get(f"/artifacts/{artifacts['curve']['id']}")).text
    assert 'id="preview-plot"' in line and "<svg" in line
    points = re.search(r'<polyline class="line" points="([^"]+)"', line)
    assert points is not None
    pairs = points.group(1).split()
    assert 100 < len(pairs) <= artifact_previews.LINE_POINTS  # 5,000 values, bucketed
    ys = [float(p.split(",")[1]) for p in pairs]
    assert min(ys) == pytest.approx(0, abs=1) and max(ys) == pytest.approx(200, abs=1)
    assert "line, shape 5000" in line

    heat = (await api.get(f"/artifacts/{artifacts['grid']['id']}")).text
    cells = re.findall(
        r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="[\d.]+" fill="(#[0-9a-f]{6})"/>', heat
    )
    assert len(cells) == 40 * 40  # 100 × 80 values, in at most 40 × 40 cells
    # Block means, low (dark violet) to high (yellow) on the ramp.
    assert cells[0].startswith("#440") and cells[-1].startswith("#f")
    assert "heatmap, shape 100 × 80, values from 0 to 7999" in heat

    text = (await api.get(f"/api/artifacts/{artifacts['long_text']['id']}/preview")).json()
    assert text["kind"] == "none" and "too large" in text["note"]  # text stays bounded


def test_a_plot_leaves_non_finite_values_out_and_draws_a_flat_array() -> None:
    drawn = artifact_previews.plot(np.array([1.0, np.nan, np.inf, 3.0]))
    assert drawn.points is not None and len(drawn.points.split()) == 2
    flat = artifact_previews.plot(np.zeros(5))
    assert flat.points is not None and {p.split(",")[1] for p in flat.points.split()} == {"200.0"}
    # A long falling line stays a falling line: bucketed points keep their order.
    falling = artifact_previews.plot(np.linspace(1.0, 0.0, 5000)).points
    assert falling is not None
    xs, ys = zip(*(map(float, p.split(",")) for p in falling.split()), strict=True)
    assert list(xs) == sorted(xs) and list(ys) == sorted(ys)
    assert not artifact_previews.plottable(np.array(["a", "b"]))
    assert not artifact_previews.plottable(np.zeros((2, 2, 2)))
