"""One JSON shape per record: what ``--output json`` prints is what the HTTP API returns, for
runs, steps, artifacts, stacks, components and flavors; secrets masked in both."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from conveyor import Client, Conveyor, RunStatus
from tests.integration.api_helpers import SECRET, serving
from tests.integration.cli_helpers import as_json
from tests.pipelines.cli_pipelines import squares


async def _api(home: Path, paths: list[str]) -> dict[str, Any]:
    async with serving(home) as (_, http):
        answers = {}
        for path in paths:
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
            answers[path] = response.json()
        return answers


def _items(page: Any) -> Any:
    return page["items"]


def test_cli_json_and_api_json_are_the_same_records(home: Path) -> None:
    with Client() as client:
        url = f"amqp://conveyor:{SECRET}@127.0.0.1:5672/"
        client.register_component("orchestrator", "remote", "rabbitmq", {"url": url})
        client.register_stack("remote", {"orchestrator": "remote", "artifact_store": "default"})

    async def one_run() -> str:
        async with Conveyor() as cv:
            run = await cv.submit(squares, n=3)
            assert (await run.wait(timeout=30)).status is RunStatus.COMPLETED
            return run.id

    run_id = asyncio.run(one_run())
    artifact_id = as_json("artifact", "list")[0]["id"]
    cli = {
        "/api/runs": as_json("run", "list"),
        f"/api/runs/{run_id}": as_json("run", "describe", run_id)["run"],
        f"/api/runs/{run_id}/steps": as_json("run", "describe", run_id)["steps"],
        "/api/artifacts": as_json("artifact", "list"),
        f"/api/artifacts/{artifact_id}": as_json("artifact", "describe", artifact_id),
        "/api/stacks": as_json("stack", "list"),
        "/api/stacks/remote": as_json("stack", "describe", "remote"),
        "/api/components?type=orchestrator": as_json("orchestrator", "list"),
        "/api/components/orchestrator/remote": as_json("orchestrator", "describe", "remote"),
        "/api/flavors?type=artifact_store": as_json("artifact-store", "flavor", "list"),
    }
    # What only a terminal needs: stack describe also probes the components.
    assert set(cli["/api/stacks/remote"].pop("reachability")) == {"orchestrator", "artifact_store"}
    api = asyncio.run(_api(home, list(cli)))
    for path, printed in cli.items():
        answered = api[path]
        if isinstance(answered, dict) and "items" in answered:
            answered = _items(answered)
        assert printed == answered, path
    everything = json.dumps(cli)
    assert SECRET not in everything
    (run,) = cli["/api/runs"]
    assert run["duration_s"] is not None and run["id"] == run_id
    remote = cli["/api/components/orchestrator/remote"]
    assert remote["stacks"] == ["remote"] and remote["active"] is False
    default_orchestrator = next(
        c for c in cli["/api/components?type=orchestrator"] if c["name"] == "default"
    )
    assert default_orchestrator["active"] is True and default_orchestrator["stacks"] == ["default"]
