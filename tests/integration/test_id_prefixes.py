"""Run and artifact ids typed by people: in the CLI, the Client and the HTTP API, an id or a
prefix of exactly one; an ambiguous, empty or wildcard-looking id changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import pytest

from conveyor import Client, Conveyor, RunStatus
from conveyor.contracts import AmbiguousId, NotFoundError, ValidationError
from tests.conftest import conveyor_cli
from tests.integration.api_helpers import serving
from tests.pipelines.cli_pipelines import squares


async def _runs_sharing_a_prefix() -> tuple[str, list[str]]:
    """Runs until two ids start alike (17 hex ids always do): the prefix and all ids."""
    ids = []
    async with Conveyor() as cv:
        for _ in range(17):
            run = await cv.submit(squares, n=1)
            assert (await run.wait(timeout=30)).status is RunStatus.COMPLETED
            ids.append(run.id)
    return _shared_prefix(ids), ids


def _run_ids() -> set[str]:
    listed = conveyor_cli("run", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    return {r["id"] for r in json.loads(listed.stdout)}


async def test_cli_refuses_ambiguous_empty_and_wildcard_ids_and_deletes_nothing() -> None:
    prefix, ids = await _runs_sharing_a_prefix()
    assert _run_ids() == set(ids)
    for typed in (prefix, "", " ", "%", "_", "%%", prefix + "%"):
        deleted = conveyor_cli("run", "delete", typed, "--yes")
        assert deleted.returncode == 1, (typed, deleted.stdout)
        assert deleted.stdout == "" and "Traceback" not in deleted.stderr
        described = conveyor_cli("run", "describe", typed)
        assert described.returncode == 1, (typed, described.stdout)
    assert _run_ids() == set(ids)
    ambiguous = conveyor_cli("run", "delete", prefix, "--yes")
    assert f"{prefix!r} is the start of more than one run id" in ambiguous.stderr
    for full in ids:
        if full.startswith(prefix):
            assert full in ambiguous.stderr
    empty = conveyor_cli("run", "describe", "")
    assert "the run id is empty" in empty.stderr
    # The shortest prefix of exactly one run still names it.
    target = ids[0]
    unique = next(
        target[:n] for n in range(1, 33) if sum(i.startswith(target[:n]) for i in ids) == 1
    )
    shown = conveyor_cli("run", "describe", unique, "--output", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["run"]["id"] == target


def _shared_prefix(ids: list[str]) -> str:
    by_first: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        by_first[i[0]].append(i)
    first, second = next(group for group in by_first.values() if len(group) > 1)[:2]
    length = next(n for n in range(1, len(first)) if first[:n] != second[:n]) - 1
    return first[:length]


def _check_client(run_prefix: str, run_ids: list[str]) -> str:
    """The Client's refusals; the prefix two artifact ids share."""
    with Client() as client:
        # 17 runs of 3 steps: 51 artifact ids, so some share a first character too.
        art_prefix = _shared_prefix([a.id for a in client.list_artifacts(limit=1000)])
        with pytest.raises(AmbiguousId, match="more than one artifact id"):
            client.get_artifact(art_prefix)
        with pytest.raises(AmbiguousId, match="more than one run id") as refused:
            client.delete_run(run_prefix)
        assert set(refused.value.candidates) < set(run_ids)
        with pytest.raises(ValidationError, match="the artifact id is empty"):
            client.get_artifact("")
        for typed in ("%", "_"):
            with pytest.raises(NotFoundError, match="no artifact with id"):
                client.get_artifact(typed)
    return art_prefix


async def test_client_and_api_refuse_ambiguous_run_and_artifact_ids(home: Path) -> None:
    run_prefix, run_ids = await _runs_sharing_a_prefix()
    # Client is the synchronous API: it refuses to run inside this test's event loop.
    art_prefix = await asyncio.to_thread(_check_client, run_prefix, run_ids)
    described = conveyor_cli("artifact", "describe", art_prefix)
    assert described.returncode == 1 and "more than one artifact id" in described.stderr
    async with serving(home) as (_, http):
        for path in (f"/api/runs/{run_prefix}", f"/api/artifacts/{art_prefix}"):
            answer = await http.get(path)
            assert answer.status_code == 422, (path, answer.text)
            assert "give more characters" in answer.json()["message"]
        assert (await http.delete(f"/api/runs/{run_prefix}")).status_code == 422
        listed = await http.get("/api/runs", params={"limit": 100})
        assert len(listed.json()["items"]) == len(run_ids)
