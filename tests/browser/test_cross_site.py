"""A page of another site, open in real Chromium, tries what the issue's page did: cancel a
run and switch the active stack of a server on 127.0.0.1. Nothing changes."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Browser

from tests.browser.test_dashboard import GATED, TIMEOUT_MS, browser, pytestmark
from tests.conftest import running_server

__all__ = ["browser", "pytestmark"]

ATTACK = """<!doctype html>
<html><body>
<form id="switch" method="post" action="{server}/api/stacks/other/activate"></form>
<script>
  var asks = [
    fetch("{server}/api/runs/{run_id}/cancel", {{method: "POST", mode: "no-cors"}}),
    fetch("{server}/api/stacks/other/activate", {{method: "POST", mode: "no-cors"}}),
    fetch("{server}/api/runs/{run_id}/cancel", {{method: "POST", mode: "no-cors",
      headers: {{"Content-Type": "text/plain"}}, body: '{{"reason": "csrf"}}'}}),
  ];
  Promise.allSettled(asks).then(function () {{ window.done = true; }});
</script>
</body></html>
"""


@contextmanager
def other_site(page: str) -> Iterator[str]:
    """A web server on another origin (``localhost`` and another port) serving ``page``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _unchanged(api: httpx.Client, run_id: str) -> None:
    stacks = api.get("/api/stacks").json()["items"]
    assert [s["name"] for s in stacks if s["active"]] == ["default"]
    assert api.get(f"/api/runs/{run_id}").json()["status"] in ("pending", "running")


def test_a_page_of_another_site_can_neither_cancel_a_run_nor_switch_the_stack(
    browser: Browser, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with (
        running_server(tmp_path / "logs") as server,
        httpx.Client(base_url=server.url, timeout=30) as api,
    ):
        try:
            assert api.post("/api/stacks/default/copy", json={"target": "other"}).is_success
            body = {"pipeline": GATED, "parameters": {"gate": str(gate)}}
            submitted = api.post("/api/runs", json=body)
            assert submitted.status_code == 201, submitted.text
            run_id = submitted.json()["id"]

            with other_site(ATTACK.format(server=server.url, run_id=run_id)) as url:
                page = browser.new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url)
                # The server answered every request the page sent before this returns.
                page.wait_for_function("window.done === true")
                _unchanged(api, run_id)
                with page.expect_navigation():
                    page.evaluate("document.getElementById('switch').submit()")
                _unchanged(api, run_id)
                assert "another site" in page.content()
        finally:
            gate.touch()
        # The dashboard itself, same-origin, still works in the same browser.
        page.goto(f"{server.url}/runs/{run_id}")
        page.wait_for_selector('[data-run-status]:text("completed")')
        assert server.stop() == 0, server.output()
