"""Dashboard pages against the real app: the run page's traceback, logs and edge labels, the
pipeline page, the stack page's queue report, and the API docs served without a CDN.

Every user-controlled text in the hostile pipeline (its name, a step's name, a log line, an
error) is markup; a page shows it as text, escaped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from markupsafe import escape

from tests.integration.api_helpers import GATED, ROOT, serving, submit, wait_status
from tests.pipelines.server_demo import HOSTILE_ERROR, HOSTILE_LOG, HOSTILE_STEP
from tests.subprocesses import free_port

HOSTILE = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:hostile_pipeline"
HOSTILE_PIPELINE = "hostile/<b>pipeline</b>"


@pytest.fixture
async def api(home: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(home) as (_, client):
        yield client


def assert_escaped(page: str, *texts: str) -> None:
    for text in texts:
        assert text not in page, text
        assert str(escape(text)) in page, text


async def test_a_failed_step_s_traceback_and_logs_show_escaped(api: httpx.AsyncClient) -> None:
    run = await submit(api, HOSTILE)
    assert (await wait_status(api, run["id"]))["status"] == "failed"
    page = (await api.get(f"/runs/{run['id']}")).text
    assert_escaped(page, HOSTILE_STEP, HOSTILE_ERROR, HOSTILE_PIPELINE)
    # The traceback is in the page, collapsible, the step's details open.
    assert '<details class="traceback" open>' in page
    assert "Traceback (most recent call last)" in page
    assert str(escape(f"ValueError: {HOSTILE_ERROR}")) in page
    assert '<span class="mark retried-mark">retried</span>' in page

    state = (await api.get(f"/ui/runs/{run['id']}/state")).json()
    failed = state["steps"][1]
    assert failed["name"] == HOSTILE_STEP and failed["attempt"] == 2
    assert failed["traceback"].rstrip().endswith(f"ValueError: {HOSTILE_ERROR}")
    assert failed["has_logs"] and failed["worker"] and failed["bar"]["width_pct"] > 0

    logs = await api.get(f"/ui/runs/{run['id']}/logs", params={"step": HOSTILE_STEP})
    assert logs.status_code == 200 and logs.headers["content-type"].startswith("text/plain")
    assert HOSTILE_LOG in logs.text
    assert logs.headers["x-content-type-options"] == "nosniff"
    nothing = await api.get(f"/ui/runs/{run['id']}/logs", params={"step": "prepare"})
    assert nothing.status_code == 404 and "no logs" in nothing.text
    assert (await api.get(f"/ui/runs/{run['id']}/logs", params={"step": "nope"})).status_code == 404
    assert (await api.get(f"/ui/runs/{run['id']}/logs")).status_code == 422
    long_name = await api.get(f"/ui/runs/{run['id']}/logs", params={"step": "x" * 5000})
    assert long_name.status_code == 422


async def test_edge_labels_and_the_pipeline_page(api: httpx.AsyncClient) -> None:
    runs = [await submit(api, GATED) for _ in range(2)]
    for run in runs:
        await wait_status(api, run["id"])
    page = (await api.get(f"/runs/{runs[0]['id']}")).text
    assert page.count('<g class="edge-label"') == 5
    assert 'href="/pipelines/gated_pipeline"' in page

    pipeline = await api.get("/pipelines/gated_pipeline")
    assert pipeline.status_code == 200
    assert pipeline.text.count('class="bar st-completed"') == 2
    assert all(f'data-run="{run["id"]}"' in pipeline.text for run in runs)
    missing = await api.get("/pipelines/nope%25_")
    assert missing.status_code == 404 and "no run of a pipeline named" in missing.text
    assert (await api.get(f"/pipelines/{'p' * 5000}")).status_code == 422

    hostile = await submit(api, HOSTILE)
    await wait_status(api, hostile["id"])
    named = await api.get(f"/pipelines/{quote(HOSTILE_PIPELINE)}")
    assert named.status_code == 200
    assert_escaped(named.text, HOSTILE_PIPELINE)
    stack = (await api.get("/stacks/default")).text
    assert stack.count('<rect class="bar st-') == 3
    assert f'href="/pipelines/{quote(HOSTILE_PIPELINE, safe="/")}"' in stack
    assert "Embedded broker" in stack


async def test_a_rabbitmq_stack_whose_broker_is_gone_still_has_a_page(
    api: httpx.AsyncClient,
) -> None:
    url = f"amqp://guest:s3cret-pass@127.0.0.1:{free_port()}/"
    component = {
        "type": "orchestrator",
        "name": "gone",
        "flavor": "rabbitmq",
        "config": {"url": url},
    }
    assert (await api.post("/api/components", json=component)).status_code == 201
    stack = {"name": "down", "components": {"orchestrator": "gone", "artifact_store": "default"}}
    assert (await api.post("/api/stacks", json=stack)).status_code == 201
    page = await api.get("/stacks/down")
    assert page.status_code == 200
    assert "Broker unreachable." in page.text and "127.0.0.1:" in page.text
    assert "s3cret-pass" not in page.text


async def test_the_api_docs_load_nothing_from_another_host(api: httpx.AsyncClient) -> None:
    for path in ("/docs", "/redoc"):
        page = await api.get(path)
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
        assert "img-src 'self' data:" in page.headers["content-security-policy"]
    docs = (await api.get("/docs")).text
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in docs
        assert (await api.get(asset)).status_code == 200
    assert (await api.get("/docs-assets/redoc.standalone.js")).status_code == 200
