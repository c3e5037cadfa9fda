"""The artifact page's previews in real headless Chromium: a DataFrame's table, a line and a
heat map drawn as inline SVG, markup in a column name and a cell shown as text, nothing
wider than a phone's screen. Screenshots go to the test's tmp_path, never committed."""

from __future__ import annotations

from pathlib import Path

import httpx
from playwright.sync_api import Browser, expect

from tests.browser.test_dashboard import TIMEOUT_MS, browser, pytestmark
from tests.browser.test_dashboard_pages import (
    NARROW,
    WIDE,
    assert_fits,
    finished_run,
    screenshot,
)
from tests.conftest import ROOT, running_server
from tests.pipelines.ml_previews import HOSTILE_CELL, HOSTILE_COLUMN

__all__ = ["browser", "pytestmark"]

PREVIEWS = f"{ROOT / 'tests' / 'pipelines' / 'ml_previews.py'}:previews"


def test_a_table_a_line_and_a_heat_map_show_on_artifact_pages(
    browser: Browser, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    with (
        running_server(tmp_path / "logs") as server,
        httpx.Client(base_url=server.url, timeout=30) as api,
    ):
        run_id = finished_run(api, PREVIEWS)
        found = api.get("/api/artifacts", params={"run_id": run_id}).json()["items"]
        ids = {a["step_name"]: a["id"] for a in found}
        page = browser.new_page(viewport=WIDE)
        page.set_default_timeout(TIMEOUT_MS)

        page.goto(f"{server.url}/artifacts/{ids['table']}")
        table = page.locator("#preview-table")
        expect(table.locator("th").first).to_contain_text(HOSTILE_COLUMN)
        expect(table.locator("tbody tr").first.locator("td").first).to_have_text(HOSTILE_CELL)
        assert page.locator("#preview-table b, script:text('cell')").count() == 0
        screenshot(page, shots, "table")

        page.goto(f"{server.url}/artifacts/{ids['curve']}")
        line = page.locator("#preview-plot polyline")
        box = line.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
        screenshot(page, shots, "line")

        page.goto(f"{server.url}/artifacts/{ids['grid']}")
        expect(page.locator("#preview-plot rect")).to_have_count(40 * 40)
        screenshot(page, shots, "heatmap")

        for step in ("table", "curve", "grid"):
            narrow = browser.new_page(viewport=NARROW)
            narrow.goto(f"{server.url}/artifacts/{ids[step]}")
            assert_fits(narrow)
            screenshot(narrow, shots, f"{step}-narrow")
            narrow.close()
