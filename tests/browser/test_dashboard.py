"""The dashboard in real headless Chromium, against ``conveyor server up`` in a subprocess.

The run is held at a gate (a file the test creates) so the test sees it running first, then
watches every step reach completed on the open page, which is never reloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect, sync_playwright

from conveyor.service.bind_checks import TOKEN_ENV
from tests.conftest import ROOT, running_server

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED_ENV = "CONVEYOR_REQUIRE_BROWSER"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
GATED = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:gated_pipeline"
STEPS = ["prepare", "wait_for_gate", "to_array", "describe", "summarize"]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium per test module (tests open their own pages, each in a fresh context):
    starting Playwright's driver and the browser cost about a second a test."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get(REQUIRED_ENV):
            pytest.fail(f"{message}, and {REQUIRED_ENV} is set")
        pytest.skip(f"{message}; set {REQUIRED_ENV}=1 to fail instead")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def test_watch_a_run_move_on_the_dashboard(browser: Browser, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with running_server(tmp_path / "logs") as server:
        submitted = httpx.post(
            f"{server.url}/api/runs",
            json={"pipeline": GATED, "parameters": {"gate": str(gate)}},
            timeout=30,
        )
        assert submitted.status_code == 201, submitted.text
        run_id = submitted.json()["id"]

        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/")
        expect(page.locator("#stacks")).to_contain_text("STACK NAME")
        page.locator("#stacks a.stack-link", has_text="default").click()
        page.wait_for_url(f"{server.url}/stacks/default")

        components = page.locator("#components")
        expect(components.locator('tr[data-component="orchestrator"]')).to_contain_text("local")
        expect(components.locator('tr[data-component="artifact_store"]')).to_contain_text(
            str(Path(os.environ["CONVEYOR_HOME"]) / "artifacts")
        )
        row = page.locator(f'#runs tr[data-run="{run_id}"]')
        expect(row).to_contain_text("gated_pipeline")
        row.locator("a.run-link").click()
        page.wait_for_url(f"{server.url}/runs/{run_id}")

        # Held at the gate: the page shows the run going, before any reload could.
        page.evaluate("window.conveyorTestMarker = 'not reloaded'")
        loads: list[str] = []
        page.on("load", lambda _: loads.append("load"))
        expect(page.locator("svg.dag g.node")).to_have_count(len(STEPS))
        expect(page.locator("svg.dag path.edge")).to_have_count(5)
        running = page.locator('svg.dag g.node[data-step="wait_for_gate"]')
        expect(running).to_have_class(re.compile(r"\bst-running\b"))
        expect(page.locator('svg.dag g.node[data-step="summarize"]')).to_have_class(
            re.compile(r"\bst-pending\b")
        )
        expect(page.locator("[data-run-status]")).to_have_text("running")
        # The timeline draws the running step's bar as still going, the pending ones not at all.
        timeline = page.locator("#timeline")
        expect(timeline.locator('.tl-row[data-step="wait_for_gate"] rect.tl-bar')).to_have_class(
            re.compile(r"\bst-running\b.*\bgoing\b")
        )
        expect(timeline.locator('.tl-row[data-step="summarize"] rect.tl-bar')).to_have_attribute(
            "width", "0%"
        )
        page.screenshot(path=str(tmp_path / "run-page-running.png"), full_page=True)

        gate.touch()
        for step in STEPS:
            expect(page.locator(f'svg.dag g.node[data-step="{step}"]')).to_have_class(
                re.compile(r"\bst-completed\b"), timeout=TIMEOUT_MS
            )
            expect(page.locator(f'#steps tr[data-step="{step}"] .status')).to_have_text("completed")
        expect(page.locator("[data-run-status]")).to_have_text("completed")
        expect(page.locator("[data-live]")).to_have_text("finished")
        for step in STEPS:
            bar = timeline.locator(f'.tl-row[data-step="{step}"] rect.tl-bar')
            expect(bar).to_have_class("tl-bar st-completed")
            assert float((bar.get_attribute("width") or "0").rstrip("%")) > 0
        assert page.evaluate("window.conveyorTestMarker") == "not reloaded"
        assert loads == []

        output = page.locator('#steps tr[data-step="summarize"] .outputs a')
        expect(output).to_have_count(1)
        screenshot = tmp_path / "run-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 1000

        output.click()
        expect(page.locator("#preview")).to_contain_text('"mean": 2.0')
        expect(page.locator("#metadata")).to_contain_text("blake3:")
        assert server.stop() == 0, server.output()


def test_the_dashboard_asks_for_the_token_once(browser: Browser, tmp_path: Path) -> None:
    token = "browser-test-token-0123456789"
    with running_server(tmp_path / "logs", env={TOKEN_ENV: token}) as server:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/stacks/default")
        page.wait_for_url(re.compile(r"/login\?next="))
        page.fill("#token", "wrong")
        page.click("form.login button")
        expect(page.locator(".error-line")).to_contain_text("not the token of a user")
        page.fill("#token", token)
        page.click("form.login button")
        page.wait_for_url(f"{server.url}/stacks/default")
        expect(page.locator("#components")).to_contain_text("ORCHESTRATOR")
        page.goto(f"{server.url}/")
        expect(page.locator("#stacks")).to_contain_text("default")
        assert token not in page.content()
        assert all(token not in c["value"] for c in page.context.cookies())
        # The session opens the dashboard, not the API.
        assert httpx.get(f"{server.url}/api/stacks").status_code == 401
