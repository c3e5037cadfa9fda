"""The HTTP API against the real app: every endpoint, its errors, idempotent submission.

Requests go through httpx's ASGI transport, so every layer but the socket is the real one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import httpx
import pytest

from conveyor.contracts import (
    ComponentType,
    RunStatus,
)
from conveyor.service.context import Services
from conveyor.service.engine import Conveyor
from tests.integration.api_helpers import (
    GATED,
    QUICKSTART,
    assert_error,
    serving,
    submit,
    wait_status,
    wait_step,
)


@pytest.fixture
async def api(home: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(home) as (_, client):
        yield client


# --- the OpenAPI document ---


async def test_openapi_describes_every_api_route(api: httpx.AsyncClient) -> None:
    response = await api.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in (
        "/api/stacks",
        "/api/stacks/{name}",
        "/api/stacks/{name}/runs",
        "/api/stacks/import",
        "/api/components",
        "/api/components/{type}/{name}",
        "/api/flavors",
        "/api/flavors/{type}/{name}",
        "/api/pipelines",
        "/api/pipelines/{name}",
        "/api/pipelines/{name}/runs",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/cancel",
        "/api/runs/{run_id}/steps",
        "/api/runs/{run_id}/steps/{step}",
        "/api/artifacts",
        "/api/artifacts/{artifact_id}",
        "/api/artifacts/{artifact_id}/preview",
        "/api/artifacts/{artifact_id}/download",
        "/healthz",
        "/metrics",
    ):
        assert path in paths, path
    assert set(paths["/api/runs"]) == {"get", "post"}
    assert "/" not in paths and "/login" not in paths  # the dashboard is not API


# --- stacks, components, flavors ---


async def test_stacks_are_listed_like_the_cli_and_read_by_name(api: httpx.AsyncClient) -> None:
    page = (await api.get("/api/stacks")).json()
    assert page["next_offset"] is None and page["offset"] == 0
    [default] = page["items"]
    assert default["name"] == "default" and default["active"] is True
    assert set(default["components"]) == {"orchestrator", "artifact_store"}
    assert default["components"]["artifact_store"]["flavor"] == "local"
    assert (await api.get(f"/api/stacks/{default['id']}")).json()["name"] == "default"
    assert (await api.get("/api/stacks/default")).json() == default
    assert_error(await api.get("/api/stacks/defualt"), 404, "defualt", "did you mean: default")
    assert_error(await api.get("/api/stacks/nope/runs"), 404, "nope")
    assert_error(await api.get("/api/stacks?limit=0"), 422, "limit")
    assert_error(await api.get("/api/stacks?offset=-1"), 422, "offset")


async def test_components_and_flavors(api: httpx.AsyncClient) -> None:
    components = (await api.get("/api/components")).json()["items"]
    assert {(c["type"], c["name"]) for c in components} == {
        ("orchestrator", "default"),
        ("artifact_store", "default"),
    }
    only = (await api.get("/api/components?type=orchestrator")).json()["items"]
    assert [c["type"] for c in only] == ["orchestrator"]
    assert (await api.get("/api/components?flavor=nope")).json()["items"] == []
    store = (await api.get("/api/components/artifact_store/default")).json()
    assert store["flavor"] == "local" and store["config"]["path"].endswith("artifacts")
    assert_error(await api.get("/api/components/orchestrator/nope"), 404, "nope")
    assert_error(await api.get("/api/components/kettle/default"), 422)

    flavors = (await api.get("/api/flavors")).json()
    assert {(f["type"], f["name"]) for f in flavors} >= {
        ("orchestrator", "local"),
        ("artifact_store", "local"),
    }
    local = (await api.get("/api/flavors/orchestrator/local")).json()
    assert local["embedded"] is True
    assert "concurrency" in [k["key"] for k in local["keys"]]
    only_stores = (await api.get("/api/flavors?type=artifact_store")).json()
    assert {f["type"] for f in only_stores} == {"artifact_store"}
    assert_error(await api.get("/api/flavors/orchestrator/kafka"), 404, "kafka")


async def test_stack_and_component_changes_follow_the_rules(
    api: httpx.AsyncClient, tmp_path: Path
) -> None:
    body = {"type": "artifact_store", "name": "shared", "flavor": "local"}
    created = await api.post("/api/components", json={**body, "config": {"path": str(tmp_path)}})
    assert created.status_code == 201, created.text
    assert created.json()["config"]["path"] == str(tmp_path)
    assert_error(
        await api.post("/api/components", json={**body, "config": {"path": "/x"}}),
        409,
        "exists",
    )
    assert_error(
        await api.post("/api/components", json={**body, "name": "bad", "config": {"nope": 1}}),
        422,
        "nope",
    )
    assert_error(await api.post("/api/components", json={"type": "orchestrator"}), 422, "name")
    # A broker URL that could never connect is refused now, not at the first run.
    orchestrator = {"type": "orchestrator", "name": "mq", "flavor": "rabbitmq"}
    assert_error(
        await api.post("/api/components", json={**orchestrator, "config": {"url": "http://x"}}),
        422,
        "must be an amqp:// or amqps:// URL",
    )

    stack = {"name": "mine", "components": {"orchestrator": "default", "artifact_store": "shared"}}
    response = await api.post("/api/stacks", json=stack)
    assert response.status_code == 201, response.text
    assert response.json()["active"] is False
    assert_error(await api.post("/api/stacks", json=stack), 409, "exists")
    assert_error(
        await api.post(
            "/api/stacks", json={"name": "half", "components": {"orchestrator": "default"}}
        ),
        422,
        "artifact store",
    )
    assert_error(
        await api.post(
            "/api/stacks",
            json={"name": "x", "components": {"orchestrator": "nope", "artifact_store": "shared"}},
        ),
        404,
        "nope",
    )
    assert_error(await api.delete("/api/components/artifact_store/shared"), 409, "mine")
    # Asked before a delete (the CLI's question): refused the same, nothing changed.
    path = "/api/components/artifact_store/shared"
    assert_error(await api.get(path, params={"deletable": "true"}), 409, "mine")
    assert (await api.get(path)).status_code == 200

    renamed = await api.post("/api/stacks/mine/rename", json={"new_name": "ours"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "ours"
    copied = await api.post("/api/stacks/ours/copy", json={"target": "theirs"})
    assert copied.status_code == 201
    updated = await api.patch(
        "/api/stacks/theirs", json={"components": {"artifact_store": "default"}}
    )
    assert updated.json()["components"]["artifact_store"]["name"] == "default"
    activated = await api.post("/api/stacks/ours/activate")
    assert activated.json()["active"] is True
    assert_error(await api.delete("/api/stacks/ours"), 409, "active")
    assert_error(await api.delete("/api/stacks/default"), 409, "default")
    # Asked before a delete's question: refused as the delete is (and as the dry run that
    # clients from before ?deletable send).
    assert_error(await api.get("/api/stacks/ours", params={"deletable": "true"}), 409, "active")
    assert_error(await api.delete("/api/stacks/ours", params={"dry_run": "true"}), 409, "active")
    await api.post("/api/stacks/default/activate")

    exported = (await api.get("/api/stacks/ours/export")).json()
    imported = await api.post("/api/stacks/import", json={"data": exported, "name": "again"})
    assert imported.status_code == 201, imported.text
    assert imported.json()["components"]["artifact_store"]["name"] == "shared"

    changed = await api.patch(
        "/api/components/artifact_store/shared", json={"config": {"path": str(tmp_path / "b")}}
    )
    assert changed.json()["config"]["path"] == str(tmp_path / "b")
    moved = await api.post(
        "/api/components/artifact_store/shared/rename", json={"new_name": "common"}
    )
    assert moved.json()["name"] == "common"
    assert (await api.get("/api/stacks/ours")).json()["components"]["artifact_store"][
        "name"
    ] == "common"
    for name in ("ours", "theirs", "again"):
        assert (await api.delete(f"/api/stacks/{name}")).status_code == 204
    assert (await api.delete("/api/components/artifact_store/common")).status_code == 204
    assert_error(await api.delete("/api/stacks/ours"), 404)
    assert_error(await api.patch("/api/stacks/default", json={"components": {}}), 422)
    assert_error(await api.post("/api/stacks/default/rename", json={"new_name": "x"}), 409)


# --- runs, steps, pipelines, artifacts ---


async def test_a_submitted_run_is_readable_with_its_steps_and_artifacts(
    api: httpx.AsyncClient,
) -> None:
    run = await submit(api, parameters={"epochs": 20, "n_samples": 2000})
    assert run["status"] in {"pending", "running", "completed"}
    assert run["stack_name"] == "default" and run["parameters"]["epochs"] == 20
    done = await wait_status(api, run["id"])
    assert done["status"] == "completed", done
    assert (await api.get(f"/api/runs/{run['id'][:10]}")).json()["id"] == run["id"]
    assert_error(await api.get("/api/runs/ffffffffffff"), 404, "ffffffffffff")

    steps = (await api.get(f"/api/runs/{run['id']}/steps")).json()
    assert [s["name"] for s in steps] == ["make_dataset", "split", "train", "evaluate"]
    assert all(s["status"] == "completed" and s["attempt"] == 1 for s in steps)
    assert steps[1]["upstream"] == ["make_dataset"]
    train = (await api.get(f"/api/runs/{run['id']}/steps/train")).json()
    assert train["outputs"]["output"]["materializer"] == "numpy"
    assert_error(await api.get(f"/api/runs/{run['id']}/steps/nope"), 404, "nope", "train")

    artifacts = (await api.get(f"/api/artifacts?run_id={run['id']}")).json()["items"]
    assert {(a["step_name"], a["output_name"]) for a in artifacts} == {
        ("make_dataset", "output"),
        ("split", "output_0"),
        ("split", "output_1"),
        ("train", "output"),
        ("evaluate", "output"),
    }
    by_step = {a["step_name"]: a for a in artifacts}
    evaluate = by_step["evaluate"]
    assert (await api.get(f"/api/artifacts/{evaluate['id']}")).json() == evaluate
    preview = (await api.get(f"/api/artifacts/{evaluate['id']}/preview")).json()
    assert preview["kind"] == "json" and "accuracy" in json.loads(preview["text"])
    weights = (await api.get(f"/api/artifacts/{by_step['train']['id']}/preview")).json()
    assert weights["kind"] == "array" and "shape (6,)" in weights["note"]
    # An array beyond the text preview's 64 KiB is still summarized, and drawn.
    big = (await api.get(f"/api/artifacts/{by_step['make_dataset']['id']}/preview")).json()
    assert big["kind"] == "array" and big["plot"]["kind"] == "heatmap"
    assert big["size"] > 64 * 1024
    download = await api.get(f"/api/artifacts/{evaluate['id']}/download")
    assert download.status_code == 200
    assert "blake3:" + blake3.blake3(download.content).hexdigest() == evaluate["ref"]["digest"]
    assert download.headers["content-length"] == str(evaluate["ref"]["size"])
    assert "evaluate.output.json" in download.headers["content-disposition"]
    assert_error(await api.get("/api/artifacts/nope/download"), 404, "nope")
    assert_error(await api.get("/api/artifacts?run_id=nope"), 404)

    pipelines = (await api.get("/api/pipelines")).json()["items"]
    assert pipelines[0]["name"] == "training_pipeline" and pipelines[0]["runs"] == 1
    assert (await api.get("/api/pipelines/training_pipeline")).json()["last_run_id"] == run["id"]
    runs = (await api.get("/api/pipelines/training_pipeline/runs")).json()["items"]
    assert [r["id"] for r in runs] == [run["id"]]
    assert_error(await api.get("/api/pipelines/nope"), 404, "nope")
    assert_error(await api.get("/api/pipelines/nope/runs"), 404, "nope")


async def test_runs_are_listed_newest_first_with_filters_and_pages(
    api: httpx.AsyncClient,
) -> None:
    first = await submit(api, parameters={"epochs": 1})
    second = await submit(api, GATED, parameters={"n": 2})
    for run in (first, second):
        await wait_status(api, run["id"])
    page = (await api.get("/api/runs?limit=1")).json()
    assert [r["id"] for r in page["items"]] == [second["id"]] and page["next_offset"] == 1
    rest = (await api.get("/api/runs?limit=1&offset=1")).json()
    assert [r["id"] for r in rest["items"]] == [first["id"]] and rest["next_offset"] is None
    by_pipeline = (await api.get("/api/runs?pipeline=gated_pipeline")).json()["items"]
    assert [r["id"] for r in by_pipeline] == [second["id"]]
    on_default = (await api.get("/api/stacks/default/runs?limit=10")).json()["items"]
    assert [r["id"] for r in on_default] == [second["id"], first["id"]]
    assert (await api.get("/api/runs?status=failed")).json()["items"] == []
    assert len((await api.get("/api/runs?status=completed&stack=default")).json()["items"]) == 2
    assert_error(await api.get("/api/runs?status=sleeping"), 422, "status")
    assert_error(await api.get("/api/runs?stack=nope"), 404, "nope")
    assert_error(await api.get("/api/runs?limit=100000"), 422, "limit")


async def test_invalid_submissions_are_refused(api: httpx.AsyncClient) -> None:
    post = api.post
    assert_error(await post("/api/runs", json={}), 422, "pipeline")
    assert_error(await post("/api/runs", json={"pipeline": QUICKSTART, "nope": 1}), 422)
    assert_error(await post("/api/runs", json={"pipeline": "no_such_module:p"}), 403, "--trust")
    missing = f"{Path(QUICKSTART.partition(':')[0]).parent}/nope.py:p"
    assert_error(await post("/api/runs", json={"pipeline": missing}), 422, "no file")
    assert_error(await post("/api/runs", json={"pipeline": "not a ref"}), 422, "reference")
    assert_error(
        await post("/api/runs", json={"pipeline": QUICKSTART, "parameters": {"epoch": 3}}),
        422,
        "epoch",
    )
    assert_error(
        await post("/api/runs", json={"pipeline": QUICKSTART, "parameters": {"on_step": 1}}),
        422,
        "reserved",
    )
    assert_error(
        await post("/api/runs", json={"pipeline": QUICKSTART, "stack": "nope"}), 404, "nope"
    )
    assert_error(
        await post(
            "/api/runs",
            json={"pipeline": QUICKSTART, "idempotency_key": "a"},
            headers={"Idempotency-Key": "b"},
        ),
        422,
        "differ",
    )
    assert_error(
        await post("/api/runs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    assert (await api.get("/api/runs")).json()["items"] == []


async def test_parameters_that_do_not_fit_the_pipeline_are_refused_before_it_runs(
    api: httpx.AsyncClient,
) -> None:
    refused = await api.post(
        "/api/runs", json={"pipeline": QUICKSTART, "parameters": {"epochs": "abc"}}
    )
    assert_error(refused, 422, "parameter 'epochs' expects int, got 'abc'")
    assert "conveyor_user_" not in refused.text
    mistyped = await api.post("/api/runs", json={"pipeline": QUICKSTART.replace("line", "lin")})
    assert_error(mistyped, 422, "has no pipeline 'training_pipelin'; did you mean")
    assert "conveyor_user_" not in mistyped.text
    assert (await api.get("/api/runs")).json()["items"] == []


async def test_a_pipeline_failing_to_build_is_named_by_its_file(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "settings.py").write_text(
        "import sys\nfrom conveyor import pipeline\n"
        "@pipeline\ndef p() -> None:\n    sys.modules[__name__].THRESHOLD\n"
    )
    async with serving(home, pipelines=folder) as (_, api):
        refused = await api.post("/api/runs", json={"pipeline": "settings.py:p"})
    assert_error(refused, 422, f"module '{folder / 'settings.py'}' has no attribute 'THRESHOLD'")


async def test_the_same_idempotency_key_creates_one_run(api: httpx.AsyncClient) -> None:
    body = {"pipeline": QUICKSTART, "parameters": {"epochs": 5}}
    headers = {"Idempotency-Key": "order-42"}
    first = await api.post("/api/runs", json=body, headers=headers)
    assert first.status_code == 201, first.text
    again = await api.post("/api/runs", json=body, headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    in_body = await api.post("/api/runs", json={**body, "idempotency_key": "order-42"})
    assert in_body.json()["id"] == first.json()["id"]

    # Concurrent retries of one request: still one run.
    racing = await asyncio.gather(
        *(
            api.post("/api/runs", json=body, headers={"Idempotency-Key": "order-43"})
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in racing) == [200, 200, 200, 200, 201]
    assert len({r.json()["id"] for r in racing}) == 1

    assert_error(
        await api.post("/api/runs", json={**body, "parameters": {"epochs": 6}}, headers=headers),
        409,
        "order-42",
    )
    runs = (await api.get("/api/runs")).json()["items"]
    assert len(runs) == 2
    assert {r["idempotency_key"] for r in runs} == {"order-42", "order-43"}
    for run in runs:
        await wait_status(api, run["id"])


async def test_cancel_and_delete(api: httpx.AsyncClient, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run = await submit(api, GATED, parameters={"gate": str(gate), "timeout_s": 20})
    try:
        await wait_step(api, run["id"], "wait_for_gate", "running")
        assert_error(await api.delete(f"/api/runs/{run['id']}"), 409, "cancel")
        cancelled = await api.post(f"/api/runs/{run['id']}/cancel", json={"reason": "enough"})
        assert cancelled.status_code == 202, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["error"] == "enough"
    finally:
        gate.touch()  # lets the step's thread end, so the worker pool stops at once
    steps = {s["name"]: s["status"] for s in (await api.get(f"/api/runs/{run['id']}/steps")).json()}
    assert steps["prepare"] == "completed" and steps["summarize"] == "cancelled"
    assert_error(await api.post(f"/api/runs/{run['id']}/cancel"), 409, "cancelled already")
    assert_error(await api.post("/api/runs/nope/cancel"), 404, "nope")
    assert (await api.delete(f"/api/runs/{run['id']}")).status_code == 204
    assert_error(await api.get(f"/api/runs/{run['id']}"), 404)
    assert_error(await api.delete(f"/api/runs/{run['id']}"), 404)


# --- health, metrics, dashboard pages ---


async def test_health_and_metrics(api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    health = await api.get("/healthz")
    assert health.status_code == 200
    report = health.json()
    assert report["status"] == "ok" and report["stack"] == "default"
    assert {"store", "broker", "controller"} <= set(report["checks"])
    run = await submit(api, parameters={"epochs": 1})
    await wait_status(api, run["id"])
    metrics = await api.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert 'conveyor_runs{stack="default",status="completed"} 1' in text
    assert 'conveyor_runs{stack="default",status="failed"} 0' in text
    assert "conveyor_step_duration_seconds_count 4" in text
    assert 'conveyor_step_duration_seconds_bucket{le="+Inf"} 4' in text
    assert 'conveyor_queue_depth{stack="default",queue="conveyor.default.runs"} 0' in text
    assert 'conveyor_controller_up{stack="default"} 1' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2, line

    monkeypatch.setattr(Conveyor, "controller_alive", property(lambda self: False))
    sick = await api.get("/healthz")
    assert sick.status_code == 503
    assert sick.json()["status"] == "unhealthy" and not sick.json()["checks"]["controller"]["ok"]


async def test_dashboard_pages(api: httpx.AsyncClient) -> None:
    run = await submit(api, parameters={"epochs": 1})
    await wait_status(api, run["id"])
    stacks = await api.get("/")
    assert stacks.status_code == 200 and stacks.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in stacks.headers["content-security-policy"]
    for column in ("ACTIVE", "STACK NAME", "STACK ID", "SHARED", "OWNER", "ARTIFACT_STORE"):
        assert column in stacks.text
    stack = (await api.get("/stacks/default")).text
    assert run["id"] in stack and "training_pipeline" in stack and "completed" in stack
    page = (await api.get(f"/runs/{run['id']}")).text
    assert page.count('class="node st-completed"') == 4 and "<svg" in page
    state = (await api.get(f"/ui/runs/{run['id']}/state")).json()
    assert state["finished"] is True and [s["status"] for s in state["steps"]] == ["completed"] * 4
    artifact_id = state["steps"][-1]["outputs"][0]["artifact_id"]
    assert f"/artifacts/{artifact_id}" in page
    artifact = (await api.get(f"/artifacts/{artifact_id}")).text
    assert "blake3:" in artifact and "accuracy" in artifact
    missing = await api.get("/stacks/nope")
    assert missing.status_code == 404 and "no stack named" in missing.text
    assert missing.headers["content-type"].startswith("text/html")
    assert (await api.get("/runs/nope")).status_code == 404
    assert (await api.get("/static/dashboard.js")).status_code == 200
    assert_error(await api.get("/api/nothing-here"), 404)
    assert_error(await api.delete("/api/runs"), 405)
    assert RunStatus.COMPLETED.value in stack


async def test_a_run_queued_behind_the_limit_is_seen_queued_and_cancelled_unstarted(
    home: Path, tmp_path: Path
) -> None:
    """The embedded stack's run queue through the server that runs it: a run submitted
    beyond ``max_active_runs`` is ``queued``, and cancelling it records it cancelled
    without any of it running."""
    async with await Services.open(home) as services:
        await services.stacks.update_component(
            ComponentType.ORCHESTRATOR, "default", {"max_active_runs": 1}
        )
    gate = tmp_path / "gate"
    parameters = {"gate": str(gate), "timeout_s": 20}
    async with serving(home) as (_, api):
        first = await submit(api, GATED, parameters=parameters)
        queued = await api.post("/api/runs", json={"pipeline": GATED, "parameters": parameters})
        assert queued.status_code == 202, queued.text  # accepted, not started
        second = queued.json()
        try:
            await wait_step(api, first["id"], "wait_for_gate", "running")
            assert (await api.get(f"/api/runs/{second['id']}")).json()["status"] == "queued"
            cancelled = await api.post(f"/api/runs/{second['id']}/cancel", json={})
            assert cancelled.status_code == 202, cancelled.text
            assert cancelled.json()["status"] == "cancelled"
        finally:
            gate.touch()
        assert (await wait_status(api, first["id"]))["status"] == "completed"
        steps = (await api.get(f"/api/runs/{second['id']}/steps")).json()
    assert {s["status"] for s in steps} == {"cancelled"}, steps
