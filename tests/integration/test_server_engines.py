"""Which engine of the server runs a run: a ``Conveyor`` per stack revision (another stack,
the served stack after an admin changed or renamed it), superseded ones stopped once their
runs ended, and a run cancelled through the engine that runs it.

Requests go through httpx's ASGI transport to the real app, as in test_api.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conveyor.service import gateway as gateway_module
from tests.integration.api_helpers import GATED, serving, submit, wait_status, wait_step


@pytest.fixture
async def api(home: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(home) as (_, client):
        yield client


async def _artifact_uris(api: httpx.AsyncClient, run_id: str) -> list[str]:
    page = (await api.get("/api/artifacts", params={"run_id": run_id})).json()
    return [a["ref"]["uri"] for a in page["items"]]


async def _move_store(api: httpx.AsyncClient, stack: str, path: Path) -> None:
    """Change ``stack``'s components as an admin would: onto a new artifact store at ``path``."""
    store = {"type": "artifact_store", "name": path.name, "flavor": "local"}
    created = await api.post("/api/components", json={**store, "config": {"path": str(path)}})
    assert created.status_code == 201, created.text
    moved = await api.patch(
        f"/api/stacks/{stack}", json={"components": {"artifact_store": path.name}}
    )
    assert moved.status_code == 200, moved.text


async def test_a_run_on_another_stack_gets_that_stack_s_controller(api: httpx.AsyncClient) -> None:
    stack = {
        "name": "other",
        "components": {"orchestrator": "default", "artifact_store": "default"},
    }
    assert (await api.post("/api/stacks", json=stack)).status_code == 201
    run = await submit(api, GATED, parameters={"n": 2}, stack="other")
    assert run["stack_name"] == "other"
    by_id = await submit(api, GATED, parameters={"n": 3}, stack=run["stack_id"])
    assert by_id["stack_name"] == "other"
    for submitted in (run, by_id):
        assert (await wait_status(api, submitted["id"]))["status"] == "completed"
    health = (await api.get("/healthz")).json()
    assert set(health["checks"]) == {"store", "broker", "broker:other", "controller"}
    on_other = (await api.get("/api/stacks/other/runs")).json()["items"]
    assert {r["id"] for r in on_other} == {run["id"], by_id["id"]}
    assert (await api.get("/api/stacks/default/runs")).json()["items"] == []


async def test_the_engine_of_an_old_stack_revision_stops_once_its_runs_ended(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "SWEEP_INTERVAL_S", 0.05)
    async with serving(home) as (app, api):
        gateway = app.state.conveyor.gateway
        component = {"type": "orchestrator", "name": "local2", "flavor": "local"}
        assert (await api.post("/api/components", json=component)).status_code == 201
        stack = {
            "name": "other",
            "components": {"orchestrator": "local2", "artifact_store": "default"},
        }
        assert (await api.post("/api/stacks", json=stack)).status_code == 201
        gate = tmp_path / "gate"
        held = await submit(api, GATED, parameters={"gate": str(gate)}, stack="other")
        await wait_step(api, held["id"], "wait_for_gate", "running")
        (old,) = gateway.conveyors()[1:]
        update = {"config": {"concurrency": 3}}
        assert (await api.patch("/api/components/orchestrator/local2", json=update)).is_success
        after = await submit(api, GATED, parameters={"n": 2}, stack="other")
        assert (await wait_status(api, after["id"]))["status"] == "completed"
        (_, new) = gateway.conveyors()[1:]
        assert new is not old
        await asyncio.sleep(0.3)  # sweeps go by: the old revision still runs a run
        assert old in gateway.conveyors() and old.controller_alive
        # Its run is still its own to cancel... and once it ended, the old engine stops.
        cancelled = (await api.post(f"/api/runs/{held['id']}/cancel")).json()
        assert cancelled["status"] == "cancelled", cancelled
        deadline = asyncio.get_running_loop().time() + 10
        while old in gateway.conveyors() or old.controller_alive is not None:
            assert asyncio.get_running_loop().time() < deadline, "the old engine was kept"
            await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="not started"):
            _ = old.services
        assert gateway.conveyors()[1:] == [new], "the current revision's engine stays"
        again = await submit(api, GATED, parameters={"n": 3}, stack="other")
        assert (await wait_status(api, again["id"]))["status"] == "completed"
        assert gateway.conveyors()[1:] == [new]


async def test_a_change_of_the_served_stack_reaches_the_next_run(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_module, "SWEEP_INTERVAL_S", 0.05)
    async with serving(home) as (app, api):
        gateway = app.state.conveyor.gateway
        gate = tmp_path / "gate"
        held = await submit(api, GATED, parameters={"gate": str(gate)})
        await wait_step(api, held["id"], "wait_for_gate", "running")
        old = gateway.served
        # An admin moves the server's own stack onto another artifact store.
        elsewhere = tmp_path / "elsewhere"
        await _move_store(api, "default", elsewhere)
        after = await submit(api, GATED, parameters={"n": 2})
        assert after["stack_name"] == "default"
        assert (await wait_status(api, after["id"]))["status"] == "completed"
        uris = await _artifact_uris(api, after["id"])
        assert uris and all(uri.startswith(elsewhere.as_uri()) for uri in uris), uris
        assert gateway.served is not old
        # The run in flight ends where it started, on the stack's old store...
        gate.touch()
        assert (await wait_status(api, held["id"]))["status"] == "completed"
        uris = await _artifact_uris(api, held["id"])
        assert len(uris) == 5 and not any(uri.startswith(elsewhere.as_uri()) for uri in uris)
        # ...and the old engine stops once it ended; the server's store stays open.
        deadline = asyncio.get_running_loop().time() + 10
        while old in gateway.conveyors() or old.controller_alive is not None:
            assert asyncio.get_running_loop().time() < deadline, "the old engine was kept"
            await asyncio.sleep(0.05)
        assert gateway.conveyors() == [gateway.served]
        assert (await api.get("/healthz")).json()["status"] == "ok"
        again = await submit(api, GATED, parameters={"n": 3})
        assert (await wait_status(api, again["id"]))["status"] == "completed"


async def test_the_served_stack_renamed_still_takes_the_runs_that_name_no_stack(
    home: Path,
) -> None:
    async with serving(home) as (_, api):
        stack = {
            "name": "lab",
            "components": {"orchestrator": "default", "artifact_store": "default"},
        }
        assert (await api.post("/api/stacks", json=stack)).status_code == 201
    async with serving(home, stack="lab") as (_, api):  # conveyor server up --stack lab
        renamed = await api.post("/api/stacks/lab/rename", json={"new_name": "team"})
        assert renamed.status_code == 200, renamed.text
        run = await submit(api, parameters={"epochs": 1})  # no stack named: the server's own
        assert run["stack_name"] == "team"
        assert (await wait_status(api, run["id"]))["status"] == "completed"
        # Deleted and registered again under its name: the new one is the server's own.
        assert (await api.delete("/api/stacks/team")).status_code == 204
        again = {**stack, "name": "team"}
        assert (await api.post("/api/stacks", json=again)).status_code == 201
        run = await submit(api, parameters={"epochs": 1})
        assert run["stack_name"] == "team"
        assert (await wait_status(api, run["id"]))["status"] == "completed"


async def test_a_cancel_reaches_the_engine_that_runs_the_run(home: Path, tmp_path: Path) -> None:
    async with serving(home) as (app, api):
        gateway = app.state.conveyor.gateway
        gate = tmp_path / "gate"
        held = await submit(api, GATED, parameters={"gate": str(gate), "timeout_s": 20})
        await wait_step(api, held["id"], "wait_for_gate", "running")
        old = gateway.served
        await _move_store(api, "default", tmp_path / "elsewhere")
        after = await submit(api, GATED, parameters={"n": 2})
        assert (await wait_status(api, after["id"]))["status"] == "completed"
        assert gateway.served is not old, "the stack's current engine is another"
        cancelled = await api.post(f"/api/runs/{held['id']}/cancel", json={"reason": "enough"})
        assert cancelled.status_code == 202, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        # The step that held ends now: had the cancel reached only the store (through the
        # stack's current engine), the engine that runs the run would go on with its steps.
        gate.touch()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2  # the later steps would have run twice over by then
        while loop.time() < deadline:
            steps = (await api.get(f"/api/runs/{held['id']}/steps")).json()
            statuses = {s["name"]: s["status"] for s in steps}
            assert statuses == {"prepare": "completed"} | dict.fromkeys(
                ("wait_for_gate", "to_array", "describe", "summarize"), "cancelled"
            ), statuses
            made = {
                a["step_name"]
                for a in (await api.get("/api/artifacts", params={"run_id": held["id"]})).json()[
                    "items"
                ]
            }
            assert made == {"prepare"}, made
            assert (await api.get(f"/api/runs/{held['id']}")).json()["status"] == "cancelled"
            await asyncio.sleep(0.05)
