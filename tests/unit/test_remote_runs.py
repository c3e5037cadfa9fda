"""Following a run over the server's event stream: each step change heard once, across a
stream that was cut and taken up again, until the run's record arrives."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conveyor.contracts import (
    NotFoundError,
    RunRecord,
    RunStatus,
    StepStatus,
    StepStatusChanged,
    utcnow,
)
from conveyor.service import remote_runs
from conveyor.service.home import Home
from conveyor.service.login import Login, save_login
from conveyor.service.remote_client import RemoteClient, ServerError

RUN = "a" * 32


def _step(name: str, status: StepStatus, attempt: int = 1) -> str:
    change = StepStatusChanged(run_id=RUN, step=name, status=status, attempt=attempt)
    return f"event: step\ndata: {change.model_dump_json()}\n\n"


def _finished() -> str:
    run = RunRecord(
        id=RUN,
        pipeline="p",
        stack_id="s",
        stack_name="team",
        status=RunStatus.COMPLETED,
        created=utcnow(),
    )
    return f": keepalive\n\nevent: run\ndata: {run.model_dump_json()}\n\n"


@pytest.fixture
def client(tmp_path: Path) -> RemoteClient:
    home = Home(tmp_path / "laptop")
    save_login(home, Login(url="http://server.test", user="alice", token="cvy_token"))
    return RemoteClient(home)


async def test_a_cut_stream_is_taken_up_again_and_no_change_is_heard_twice(
    client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_runs, "RECONNECT_DELAY_S", 0.0)
    answers = [
        "retry: 1000\n\n" + _step("load", StepStatus.COMPLETED),  # then cut
        httpx.ConnectError("refused"),
        _step("load", StepStatus.COMPLETED) + _step("train", StepStatus.FAILED) + _finished(),
    ]
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        next_answer = answers.pop(0)
        if isinstance(next_answer, Exception):
            raise next_answer
        return httpx.Response(200, text=next_answer, headers={"content-type": "text/event-stream"})

    heard: list[tuple[str, StepStatus]] = []
    record = await remote_runs.follow(
        client,
        RUN,
        lambda change: heard.append((change.step, change.status)),
        transport=httpx.MockTransport(answer),
    )
    assert record.id == RUN and record.status is RunStatus.COMPLETED
    assert heard == [("load", StepStatus.COMPLETED), ("train", StepStatus.FAILED)]
    assert len(asked) == 3
    assert {r.url.path for r in asked} == {f"/api/runs/{RUN}/events"}
    assert asked[0].headers["authorization"] == "Bearer cvy_token"


async def test_a_refusal_of_the_stream_is_the_servers_message(client: RemoteClient) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"message": "no run 'x'"})

    with pytest.raises(NotFoundError, match="no run 'x'"):
        await remote_runs.follow(client, RUN, print, transport=httpx.MockTransport(answer))


async def test_a_server_gone_for_good_is_said_so(
    client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_runs, "RECONNECT_DELAY_S", 0.0)
    monkeypatch.setattr(remote_runs, "RECONNECT_FOR_S", 0.0)

    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(ServerError, match=f"conveyor run describe {RUN}"):
        await remote_runs.follow(client, RUN, print, transport=httpx.MockTransport(answer))
