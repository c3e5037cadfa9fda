"""Serving the app in-process for the API tests: lifespan, store, controller and workers are
the real ones; requests go through httpx's ASGI transport instead of a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from conveyor.service.api import create_app

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = f"{ROOT / 'examples' / 'quickstart.py'}:training_pipeline"
GATED = f"{ROOT / 'tests' / 'pipelines' / 'server_demo.py'}:gated_pipeline"
TOKEN = "test-token-0123456789abcdef"
BASE_URL = "http://localhost"
"""Where in-process clients send requests: a Host the server answers to by default."""
SECRET = "hunter2-do-not-show"
FINISHED = {"completed", "failed", "cancelled"}


@asynccontextmanager
async def serving(
    home: Path, *, token: str | None = None, **options: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and a client that talks to it in-process;
    ``options`` go to ``create_app``."""
    app = create_app(home, token=token, poll_interval_s=0.1, **options)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as c:
            yield app, c


async def submit(client: httpx.AsyncClient, ref: str = QUICKSTART, **body: Any) -> dict[str, Any]:
    response = await client.post("/api/runs", json={"pipeline": ref, **body})
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


async def wait_status(
    client: httpx.AsyncClient, run_id: str, statuses: set[str] = FINISHED, timeout: float = 30
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        run: dict[str, Any] = (await client.get(f"/api/runs/{run_id}")).json()
        if run["status"] in statuses:
            return run
        assert asyncio.get_running_loop().time() < deadline, f"run stuck in {run['status']}"
        await asyncio.sleep(0.05)


async def wait_step(
    client: httpx.AsyncClient, run_id: str, step: str, status: str, timeout: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await client.get(f"/api/runs/{run_id}/steps/{step}")).json()["status"] != status:
        assert asyncio.get_running_loop().time() < deadline, f"{step} never became {status}"
        await asyncio.sleep(0.05)


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["error"] and body["message"]
    for word in words:
        assert word in body["message"], body["message"]
