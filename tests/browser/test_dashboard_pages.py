"""The run, stack, pipeline and API docs pages in real headless Chromium, as a user sees them.

Each test saves screenshots into its tmp_path (``screenshots/``) for a person to look at;
they are never committed. Every page is also opened 420 px wide, where nothing may scroll
sideways, and every user-controlled text (a step name, a log line, an error) is markup that
must show as text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
from playwright.sync_api import Browser, Page, Route, expect

from conveyor.contracts import Topology
from tests.browser.test_dashboard import GATED, TIMEOUT_MS, browser, pytestmark
from tests.conftest import ROOT, running_server
from tests.integration.rabbitmq_support import STACK, Processes, register_stack, vhost
from tests.pipelines.server_demo import HOSTILE_ERROR, HOSTILE_LOG, HOSTILE_STEP
from tests.subprocesses import free_port

__all__ = ["browser", "pytestmark", "vhost"]

T = TypeVar("T")
HOSTILE = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:hostile_pipeline"
HOSTILE_PIPELINE = "hostile/<b>pipeline</b>"
NARROW = {"width": 420, "height": 860}
WIDE = {"width": 1280, "height": 900}
FINISHED = {"completed", "failed", "cancelled"}


def finished_run(api: httpx.Client, ref: str, **parameters: object) -> str:
    submitted = api.post("/api/runs", json={"pipeline": ref, "parameters": parameters})
    assert submitted.status_code == 201, submitted.text
    run_id: str = submitted.json()["id"]
    deadline = time.monotonic() + 60
    while api.get(f"/api/runs/{run_id}").json()["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"run {run_id} did not finish"
        time.sleep(0.1)
    return run_id


def screenshot(page: Page, folder: Path, name: str, *, full_page: bool = True) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 1000


def assert_fits(page: Page) -> None:
    """Nothing on the page is wider than the window: no sideways scrolling."""
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert max(widths[:2]) <= widths[2], (page.url, widths)


def assert_nothing_injected(page: Page) -> None:
    assert page.evaluate("window.pwned") is None
    assert page.locator("img[src='x'], b:text('pipeline')").count() == 0


def test_run_pipeline_and_stack_pages_of_a_failed_run(browser: Browser, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    with (
        running_server(tmp_path / "logs") as server,
        httpx.Client(base_url=server.url, timeout=30) as api,
    ):
        finished_run(api, GATED)
        run_id = finished_run(api, HOSTILE)
        page = browser.new_page(viewport=WIDE)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/runs/{run_id}")

        # The DAG's edge says which output feeds the step.
        label = page.locator("svg.dag g.edge-label")
        expect(label).to_have_count(1)
        expect(label.locator("text")).to_have_text("output")
        expect(label.locator("title")).to_have_text(f"prepare → {HOSTILE_STEP}: output")

        # The timeline: a bar per step, the failed step marked as retried, its worker shown.
        rows = page.locator("#timeline .tl-row")
        expect(rows).to_have_count(2)
        failed_row = rows.nth(1)
        expect(failed_row.locator(".tl-name")).to_have_text(HOSTILE_STEP)
        expect(failed_row.locator(".retried-mark")).to_be_visible()
        expect(failed_row.locator(".tl-meta")).to_contain_text("attempt 2 of 2")
        expect(rows.nth(0).locator(".retried-mark")).to_be_hidden()
        for i in range(2):
            bar = rows.nth(i).locator("rect.tl-bar")
            assert float(bar.get_attribute("width").rstrip("%")) > 0
        expect(failed_row.locator("rect.tl-bar")).to_have_class("tl-bar st-failed")

        # The failed step's details are open: its traceback and logs, as text.
        details = page.locator("details.step-detail").nth(1)
        expect(details).to_have_attribute("open", "")
        traceback = details.locator("pre.traceback-text")
        expect(traceback).to_contain_text("Traceback (most recent call last)")
        expect(traceback).to_contain_text(f"ValueError: {HOSTILE_ERROR}")
        expect(details.locator("pre.logs-text")).to_contain_text(HOSTILE_LOG)
        # A closed step's logs load when it is opened.
        first = page.locator("details.step-detail").nth(0)
        first.locator("> summary").click()
        expect(first.locator(".logs-note")).to_contain_text("printed and logged nothing")
        assert_nothing_injected(page)
        screenshot(page, shots, "run-page")

        page.locator("a.pipeline-link").click()
        page.wait_for_url(f"{server.url}/pipelines/{quote(HOSTILE_PIPELINE)}")
        expect(page.locator("h1")).to_have_text(f"Pipeline {HOSTILE_PIPELINE}")
        expect(page.locator("#run-chart rect.bar")).to_have_count(1)
        expect(page.locator(f'#runs tr[data-run="{run_id}"]')).to_contain_text("failed")
        assert_nothing_injected(page)
        screenshot(page, shots, "pipeline-page")

        page.goto(f"{server.url}/stacks/default")
        bars = page.locator("#run-chart rect.bar")
        expect(bars).to_have_count(2)
        expect(bars.nth(0)).to_have_class("bar st-completed")
        expect(bars.nth(1)).to_have_class("bar st-failed")
        expect(page.locator("#run-chart .legend")).to_contain_text("failed 1")
        expect(page.locator("#queues")).to_contain_text("Embedded broker")
        screenshot(page, shots, "stack-page")

        narrow = browser.new_page(viewport=NARROW)
        narrow.set_default_timeout(TIMEOUT_MS)
        artifact = api.get("/api/artifacts", params={"run_id": run_id}).json()["items"][0]
        for name, path in [
            ("stacks", "/"),
            ("stack", "/stacks/default"),
            ("run", f"/runs/{run_id}"),
            ("pipeline", f"/pipelines/{quote(HOSTILE_PIPELINE)}"),
            ("artifact", f"/artifacts/{artifact['id']}"),
        ]:
            narrow.goto(f"{server.url}{path}")
            expect(narrow.locator("h1")).to_be_visible()
            assert_fits(narrow)
            screenshot(narrow, shots, f"narrow-{name}")
        assert server.stop() == 0, server.output()


def test_stacks_page_marks_the_active_stack_without_emoji(browser: Browser, tmp_path: Path) -> None:
    with running_server(tmp_path / "logs") as server:
        page = browser.new_page(viewport=WIDE)
        page.goto(f"{server.url}/")
        active = page.locator('#stacks tr[data-stack="default"] .active-mark')
        expect(active).to_have_text("active")
        html = page.content()
        # Pictographs need an emoji font; the page uses text and CSS instead.
        assert not [c for c in html if ord(c) >= 0x1F000 or 0x2600 <= ord(c) <= 0x27BF]
        screenshot(page, tmp_path / "screenshots", "stacks-page")


def test_queue_depth_and_consumers_of_a_rabbitmq_stack(
    browser: Browser, tmp_path: Path, vhost: str, home: Path
) -> None:
    in_thread(register_stack(vhost, tmp_path / "artifacts", home=home))
    topology = Topology(stack=STACK)
    (tmp_path / "processes").mkdir()
    processes = Processes(tmp_path / "processes")
    with (
        running_server(tmp_path / "logs") as server,
        httpx.Client(base_url=server.url, timeout=30) as api,
    ):
        try:
            processes.start("worker", "worker", "start", "--stack", STACK).wait_for_log(
                "worker started"
            )
            in_thread(publish(vhost, topology.runs_queue, 3))
            unreachable = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
            component = {
                "type": "orchestrator",
                "name": "gone",
                "flavor": "rabbitmq",
                "config": {"url": unreachable},
            }
            assert api.post("/api/components", json=component).is_success
            stack = {
                "name": "down",
                "components": {"orchestrator": "gone", "artifact_store": "shared"},
            }
            assert api.post("/api/stacks", json=stack).is_success

            page = browser.new_page(viewport=WIDE)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{server.url}/stacks/{STACK}")
            runs = page.locator(f'#queue-table tr[data-queue="{topology.runs_queue}"]')
            expect(runs.locator(".messages")).to_have_text("3")
            expect(runs.locator(".consumers")).to_have_text("0")
            steps = page.locator(f'#queue-table tr[data-queue="{topology.step_queue("default")}"]')
            expect(steps.locator(".consumers")).to_have_text("1")
            assert "guest:guest" not in page.content()
            screenshot(page, tmp_path / "screenshots", "rabbitmq-stack-page")

            response = page.goto(f"{server.url}/stacks/down")
            assert response is not None and response.status == 200
            expect(page.locator("#queues-problem")).to_contain_text("Broker unreachable")
            expect(page.locator("#queues-problem")).to_contain_text(
                urlsplit(unreachable).netloc.split("@")[1]
            )
            assert "guest:guest" not in page.content()
            screenshot(page, tmp_path / "screenshots", "unreachable-stack-page")
        finally:
            processes.stop_all()


def in_thread(work: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(work)`` beside Playwright's own event loop, which runs in this thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


async def publish(url: str, queue: str, count: int) -> None:
    """``count`` messages into ``queue``, which nobody consumes (no controller runs)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, passive=True)
        for i in range(count):
            await channel.default_exchange.publish(aio_pika.Message(f"{i}".encode()), queue)


def test_api_docs_work_with_every_other_host_blocked(browser: Browser, tmp_path: Path) -> None:
    blocked: list[str] = []

    def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with running_server(tmp_path / "logs") as server:
        context = browser.new_context(viewport=WIDE)
        context.route("**/*", local_only)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{server.url}/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Conveyor")
        expect(page.locator(".opblock-summary-path").first).to_be_visible()
        expect(page.locator('.opblock-summary-path[data-path="/api/runs"]').first).to_be_visible()
        screenshot(page, tmp_path / "screenshots", "api-docs", full_page=False)
        page.goto(f"{server.url}/redoc")
        expect(page.locator("h1").first).to_contain_text("Conveyor")
        screenshot(page, tmp_path / "screenshots", "api-redoc", full_page=False)
        assert blocked == []
        context.close()
