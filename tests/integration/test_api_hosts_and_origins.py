"""Requests a web page makes the browser send: a Host the server does not go by (DNS
rebinding) and state-changing requests from another site (CSRF) are refused."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.api_helpers import (
    GATED,
    TOKEN,
    assert_error,
    serving,
    submit,
    wait_status,
    wait_step,
)

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://localhost:9999"},  # another port is another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},
    {"Sec-Fetch-Site": "cross-origin", "Origin": "http://localhost:1"},
]


@pytest.fixture
async def served(home: Path) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with serving(home, allowed_hosts=["conveyor.example.com"]) as found:
        yield found


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8237", "127.0.0.1:8237", "127.5.6.7", "[::1]:8237", "[::1]",
     "LOCALHOST", "conveyor.example.com", "conveyor.example.com:443", "10.1.2.3:8237"],
)  # fmt: skip
async def test_loopback_names_addresses_and_configured_hosts_are_served(
    served: tuple[FastAPI, httpx.AsyncClient], host: str
) -> None:
    _, api = served
    assert (await api.get("/api/stacks", headers={"Host": host})).status_code == 200
    assert (await api.get("/healthz", headers={"Host": host})).status_code == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8237", "localhost.evil.example", "conveyor.example.com.evil",
     "127.0.0.1.nip.io", "", "a" * 300, "localhost:port", "[::1", "conveyor.example.com:1:2"],
)  # fmt: skip
async def test_any_other_host_is_refused_before_anything_runs(
    served: tuple[FastAPI, httpx.AsyncClient], host: str
) -> None:
    """A page on evil.example whose name now points at 127.0.0.1 reaches the server with
    its own name in the Host header: DNS rebinding."""
    _, api = served
    for method, path in (("GET", "/api/stacks"), ("GET", "/"), ("POST", "/api/runs")):
        response = await api.request(method, path, headers={"Host": host})
        assert_error(response, 421, "--allowed-host")
        assert "a" * 101 not in response.text


def _sample_path(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: "orchestrator" if m[1] == "type" else "x", path)


async def test_cross_site_requests_never_change_anything(
    served: tuple[FastAPI, httpx.AsyncClient], tmp_path: Path
) -> None:
    app, api = served
    gate = tmp_path / "gate"
    run = await submit(api, GATED, parameters={"gate": str(gate)})
    await wait_step(api, run["id"], "wait_for_gate", "running")
    await api.post("/api/stacks/default/copy", json={"target": "other"})

    routes = [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in STATE_CHANGING
    ]
    routes += [("POST", "/login"), ("POST", "/logout")]
    assert len(routes) > 15
    for method, path in routes:
        for headers in CROSS_SITE:
            response = await api.request(method, _sample_path(path), headers=headers)
            assert_error(response, 403, "another site")
    # What the page did: cancel the run, switch the active stack.
    for headers in CROSS_SITE:
        assert_error(await api.post(f"/api/runs/{run['id']}/cancel", headers=headers), 403)
        assert_error(await api.post("/api/stacks/other/activate", headers=headers), 403)
    stacks = (await api.get("/api/stacks")).json()["items"]
    assert [s["name"] for s in stacks if s["active"]] == ["default"]
    assert (await api.get(f"/api/runs/{run['id']}")).json()["status"] == "running"
    gate.touch()
    assert (await wait_status(api, run["id"]))["status"] == "completed"


async def test_same_origin_pages_and_clients_without_a_browser_still_change_things(
    served: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, api = served
    await api.post("/api/stacks/default/copy", json={"target": "other"})
    for headers in (
        {},  # curl, httpx, the CLI: no Origin, no Sec-Fetch-Site
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
        # The dashboard's forms: Referrer-Policy no-referrer makes Chromium send Origin null.
        {"Sec-Fetch-Site": "same-origin", "Origin": "null"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
        {"Origin": "http://localhost"},  # a browser without Fetch Metadata
        {"Origin": "https://conveyor.example.com", "Host": "conveyor.example.com"},
    ):
        response = await api.post("/api/stacks/other/activate", headers=headers)
        assert response.status_code == 200, (headers, response.text)
        response = await api.post("/api/stacks/default/activate", headers=headers)
        assert response.status_code == 200, (headers, response.text)
    # Reads are never refused for their origin: a link from another site opens a page.
    assert (await api.get("/", headers={"Sec-Fetch-Site": "cross-site"})).status_code == 200


async def test_with_a_token_a_cross_site_login_is_refused_and_a_same_origin_one_works(
    home: Path,
) -> None:
    async with serving(home, token=TOKEN) as (_, api):
        form = {"token": TOKEN, "next": "/"}
        refused = await api.post("/login", data=form, headers={"Sec-Fetch-Site": "cross-site"})
        assert refused.status_code == 403 and "set-cookie" not in refused.headers
        ok = await api.post(
            "/login",
            data=form,
            headers={"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
        )
        assert ok.status_code == 303 and "conveyor_session" in ok.headers["set-cookie"]
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        response = await api.post("/api/stacks/default/copy", json={"target": "b"}, headers=bearer)
        assert response.status_code == 201, response.text
