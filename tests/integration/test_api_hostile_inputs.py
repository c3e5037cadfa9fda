"""No input is a server error: hostile ids, offsets, bodies and content types get a 4xx.

Every route of the app (API, dashboard, operations) is sent every hostile value in each of
its path parameters, in its paging parameters and as its body.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
from fastapi import FastAPI

from conveyor.service.api.submitted_code import MAX_SPEC_BODY_BYTES
from tests.integration.api_helpers import QUICKSTART, serving, submit, wait_status

HOSTILE_IDS = ["x" * 60_000, "%", "_", "%25", "%_%", "é✓𝄞", "\x00", " ", "..", "a/b", "*"]
HOSTILE_OFFSETS = [str(2**63), str(2**64), str(2**63 - 1), "-1", str(-(2**63) - 1), "1e400",
                   "NaN", "", "0x10"]  # fmt: skip
HOSTILE_JSON = [
    '{"pipeline": "QUICKSTART", "parameters": {"epochs": Infinity}}',
    '{"pipeline": "QUICKSTART", "parameters": {"epochs": NaN}}',
    '{"pipeline": "QUICKSTART", "parameters": {"epochs": -Infinity}}',
    '{"config": {"concurrency": NaN}}',
    '{"name": "x", "components": {"orchestrator": "default"}, "x": Infinity}',
    '{"reason": NaN}',
    '{"data": {"a": Infinity}}',
    '{"new_name": "' + "n" * 60_000 + '"}',
    "[]",
    "null",
    "1e999999",
    '{"a": ' * 10_000 + "1" + "}" * 10_000,
    "{",
    "\xff\xfe",
]
WRONG_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
               "application/json; charset=latin-1", "image/png"]  # fmt: skip
# Over the largest body any route reads (a compiled pipeline's).
HUGE = b'{"pipeline": "' + b"p" * MAX_SPEC_BODY_BYTES + b'"}'


def _fill(path: str, value: str) -> Iterator[str]:
    """``path`` with ``value`` in each of its parameters in turn (a plain name in the others)."""
    names = re.findall(r"\{(\w+)\}", path)
    for hostile in [n for n in names if n != "type"] or [None]:
        filled = path
        for name in names:
            shown = quote(value, safe="") if name == hostile else "x"
            filled = filled.replace(f"{{{name}}}", "orchestrator" if name == "type" else shown)
        yield filled


DASHBOARD = [
    ("GET", "/"),
    ("GET", "/stacks/{name}"),
    ("GET", "/pipelines/{name}"),
    ("GET", "/runs/{run_id}"),
    ("GET", "/ui/runs/{run_id}/state"),
    ("GET", "/ui/runs/{run_id}/logs?step=prepare"),
    ("GET", "/artifacts/{artifact_id}"),
    ("GET", "/artifacts/{artifact_id}/download"),
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
]


def _routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """Every route: those the OpenAPI document lists, and the dashboard's."""
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            yield method.upper(), path
    yield from DASHBOARD


def _no_server_error(response: httpx.Response, asked: str) -> None:
    assert response.status_code < 500, (asked, response.status_code, response.text[:500])


async def test_every_route_answers_hostile_input_with_a_client_error(
    home: Path, tmp_path: Path
) -> None:
    async with serving(home) as (app, api):
        run = await submit(api, QUICKSTART, parameters={"epochs": 1})
        await wait_status(api, run["id"])
        routes = list(_routes(app))
        assert len(routes) > 40
        for method, path in routes:
            for value in [*HOSTILE_IDS, run["id"]]:
                for url in _fill(path, value):
                    response = await api.request(method, url)
                    _no_server_error(response, f"{method} {url[:80]}")
            target = next(_fill(path, run["id"]))
            for offset in HOSTILE_OFFSETS:
                for query in (f"offset={offset}", f"limit={offset}"):
                    response = await api.request(method, f"{target}?{query}")
                    _no_server_error(response, f"{method} {path}?{query}")
            if method in ("GET", "HEAD"):
                continue
            for text in HOSTILE_JSON:
                body = text.replace("QUICKSTART", QUICKSTART).encode("utf-8", "surrogatepass")
                headers = {"Content-Type": "application/json"}
                response = await api.request(method, target, content=body, headers=headers)
                _no_server_error(response, f"{method} {path} with {text[:40]!r}")
            for content_type in WRONG_TYPES:
                headers = {"Content-Type": content_type}
                response = await api.request(method, target, content=b"\x00{}", headers=headers)
                _no_server_error(response, f"{method} {path} as {content_type}")


async def test_a_huge_body_is_refused_unread(home: Path) -> None:
    async with serving(home) as (_, api):
        for path in ("/api/runs", "/api/stacks/import", "/api/runs/x/cancel", "/api/components"):
            response = await api.post(
                path, content=HUGE, headers={"Content-Type": "application/json"}
            )
            # Starlette answers a Content-Length over the limit itself, in plain text.
            assert response.status_code == 413, (path, response.text[:300])
            # A compiled pipeline may be longer than the other bodies.
            limit = MAX_SPEC_BODY_BYTES if path == "/api/runs" else 1 << 20

            async def chunks(megabytes: int = limit >> 20) -> object:
                for _ in range(megabytes + 1):  # no Content-Length: counted as it arrives
                    yield b"p" * (1 << 20)

            response = await api.post(path, content=chunks())  # type: ignore[arg-type]
            assert response.status_code == 413, (path, response.text[:300])
            assert f"larger than {limit} bytes" in response.text


async def test_infinity_in_parameters_is_invalid_input(home: Path) -> None:
    async with serving(home) as (_, api):
        for word in ("Infinity", "NaN", "-Infinity"):
            body = f'{{"pipeline": "{QUICKSTART}", "parameters": {{"epochs": {word}}}}}'
            response = await api.post(
                "/api/runs", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, response.text
            assert "JSON" in response.json()["message"]
