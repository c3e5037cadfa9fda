"""Cached steps and retried runs on the dashboard's run page, in real headless Chromium: a
colour of their own, links to the run that computed the outputs and between the two runs."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, expect

from tests.browser.test_dashboard import TIMEOUT_MS, browser, pytestmark
from tests.conftest import conveyor_cli, running_server
from tests.integration.test_step_caching import FIVE, run, write

__all__ = ["browser", "pytestmark"]


def test_a_retried_run_shows_its_cached_steps_and_both_links(
    browser: Browser, tmp_path: Path
) -> None:
    write(tmp_path, FIVE)
    failed_id = run(tmp_path, expect=1)["run"]["id"]
    (tmp_path / "fixed.flag").touch()
    retried = conveyor_cli("run", "retry", failed_id, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr
    with running_server(tmp_path / "logs") as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        listed = page.request.get(f"{server.url}/api/runs").json()["items"]
        by_retry = {r["retry_of"]: r["id"] for r in listed if r["retry_of"]}
        retry_id = by_retry[failed_id]

        page.goto(f"{server.url}/runs/{retry_id}")
        row = page.locator('#steps tr[data-step="one"]')
        expect(row).to_have_attribute("data-status", "cached")
        expect(row.locator(".cached-from a")).to_have_attribute("href", f"/runs/{failed_id}")
        expect(page.locator('#steps tr[data-step="three"]')).to_have_attribute(
            "data-status", "completed"
        )
        mark = page.locator('.tl-row[data-step="two"] .cached-mark')
        expect(mark).to_be_visible()
        expect(mark).to_have_attribute("href", f"/runs/{failed_id}")
        colours = page.evaluate(
            """[...document.querySelectorAll('svg.dag g.node')].map(
                n => [n.getAttribute('data-step'),
                      getComputedStyle(n.querySelector('rect')).fill])"""
        )
        fills = dict(colours)
        assert fills["one"] == fills["two"] != fills["three"] == fills["four"]
        page.screenshot(path=str(tmp_path / "retried-run.png"), full_page=True)

        page.locator("a.retry-of").click()
        expect(page).to_have_url(f"{server.url}/runs/{failed_id}")
        expect(page.locator("a.retried-by")).to_have_attribute("href", f"/runs/{retry_id}")
        expect(page.locator('#steps tr[data-step="three"]')).to_have_attribute(
            "data-status", "failed"
        )
