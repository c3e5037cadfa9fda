"""Runs from a home logged in to a server: compiled here, their code uploaded, followed live.

The client compiles the pipeline (its parameters checked against the signature here, as on a
local store), uploads each code archive to the target stack's artifact store through the
server (``PUT /api/code/{digest}``), submits the compiled spec (``POST /api/runs``), then
follows the run over server-sent events (``GET /api/runs/{id}/events``) and loads its
outputs through the server's artifact downloads with this client's materializers. Nothing of
the pipeline is imported on the server, and nothing is read from this home's own store.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ArtifactRecord,
    BlobRef,
    ConveyorError,
    NotFoundError,
    PipelineSpec,
    RunRecord,
    StepRecord,
    StepStatus,
    StepStatusChanged,
    ValidationError,
)
from conveyor.service.handles import RunHandle
from conveyor.service.home import Home
from conveyor.service.remote_client import (
    RemoteClient,
    ServerError,
    _refused,
    _run_record,
    tls_settings,
)
from conveyor.service.version import conveyor_version, incompatible
from conveyor.workers import digests
from conveyor.workers.release import release_key

if TYPE_CHECKING:
    from conveyor.workers.steps import StepDefinition

T = TypeVar("T")

RECONNECT_FOR_S = 120.0
"""How long a follower tries to get a cut stream back before it gives up."""
RECONNECT_DELAY_S = 1.0
STREAM_READ_TIMEOUT_S = 60.0
"""Longer than the server's keepalive (15 s): a silent stream is a dead one."""
PREVIEW_BYTES = 4096
"""Outputs of the last steps that the report prints: small JSON and str values."""

StepHandler = Callable[[StepStatusChanged], None]


class ServerCodeStore:
    """An ``ArtifactStore`` that only puts, through the server, into one stack's store: what
    ``attach_code`` uploads a run's code archives to from a logged-in client."""

    def __init__(self, client: RemoteClient, stack: str) -> None:
        self._client = client
        self._stack = stack

    @property
    def location(self) -> str:
        return f"stack {self._stack!r} of {self._client.login.url}"

    def put(self, write: Callable[[str], str | None]) -> BlobRef:
        handle, path = tempfile.mkstemp(prefix="conveyor-code-", suffix=".zip")
        os.close(handle)
        try:
            write(path)
            digest, _ = digests.of_file(path)
            where = f"/api/code/{quote(digest, safe='')}"
            params = {"stack": self._stack}
            try:  # taken before: not again
                taken = self._client.request("GET", where, params=params)
                return BlobRef.model_validate(taken.json())
            except NotFoundError:
                pass
            with open(path, "rb") as body:
                found = self._client.request(
                    "PUT",
                    where,
                    params=params,
                    content=body,
                    headers={"Content-Type": "application/zip"},
                    timeout=httpx.Timeout(30.0, write=300.0),
                )
        finally:
            os.unlink(path)
        return BlobRef.model_validate(found.json())

    def put_bytes(self, data: bytes) -> BlobRef:
        def write(path: str) -> None:
            Path(path).write_bytes(data)

        return self.put(write)

    def get_bytes(self, uri: str, digest: str) -> bytes:
        raise ConveyorError("code archives are uploaded through the server, never read back")

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        raise ConveyorError("code archives are uploaded through the server, never read back")

    def check(self) -> None:
        """The server checks its store; nothing to check here."""


def check_server_version(client: RemoteClient) -> dict[str, Any]:
    """``/api/me``, after checking that the server's major version is this client's."""
    me = client.me()
    problem = incompatible(conveyor_version(), str(me.get("server_version", "?")))
    if problem:
        raise ServerError(problem)
    return me


def submit(
    client: RemoteClient,
    spec: PipelineSpec,
    definitions: dict[str, StepDefinition],
    *,
    stack: str | None = None,
    cache: bool = True,
    retry_of: str | None = None,
    idempotency_key: str | None = None,
) -> RunRecord:
    """Upload the code of a compiled pipeline and start a run of it on the server."""
    from conveyor.workers.code_archive import attach_code

    me = check_server_version(client)
    target = stack or os.environ.get("CONVEYOR_STACK") or str(me["active_stack"])
    shipped = attach_code(spec, definitions, ServerCodeStore(client, target))
    body: dict[str, Any] = {
        "spec": shipped.model_dump(mode="json"),
        "stack": target,
        "cache": cache,
    }
    if retry_of is not None:
        body["retry_of"] = retry_of
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    try:
        response = client.request("POST", "/api/runs", json=body)
    except ValidationError as exc:
        raise _older_server(exc, str(me.get("server_version", "?"))) from None
    return _run_record(response.json())


def _older_server(refused: ValidationError, server: str) -> ValidationError:
    """``refused`` saying, when the server's release is older than this client's, that the
    spec may carry a field the server does not know yet (a newer client's): its own message
    names the field, not the releases."""
    mine = conveyor_version()
    theirs, ours = release_key(server), release_key(mine)
    if theirs is None or ours is None or theirs >= ours:
        return refused
    return ValidationError(
        f"{refused}; the server runs Conveyor {server} and this client Conveyor {mine}: what "
        f"this client sends may be newer than the server reads; upgrade the server to "
        f"Conveyor {mine}, or submit from a client of Conveyor {server}"
    )


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` of a server-sent event stream."""
    kind, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", list[str]()
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


async def follow(
    client: RemoteClient,
    run_id: str,
    on_step: StepHandler,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RunRecord:
    """Follow run ``run_id`` on the server until it finished; its record.

    ``on_step`` hears each step change once, even across a stream that was cut and taken up
    again (the server then sends the current statuses again)."""
    seen: set[tuple[str, StepStatus, int]] = set()
    login = client.login
    http = httpx.AsyncClient(
        base_url=login.url,
        headers={
            "Authorization": f"Bearer {login.token}",
            "User-Agent": f"conveyor/{conveyor_version()}",
        },
        timeout=httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT_S),
        transport=transport,
        verify=tls_settings(),
    )
    loop = asyncio.get_running_loop()
    failing_since: float | None = None
    async with http:
        while True:
            try:
                async with http.stream("GET", f"/api/runs/{quote(run_id, safe='')}/events") as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise _refused(r, login)
                    failing_since = None
                    async for kind, data in _events(r):
                        if kind == "step":
                            change = StepStatusChanged.model_validate_json(data)
                            key = (change.step, change.status, change.attempt)
                            if key not in seen:
                                seen.add(key)
                                on_step(change)
                        elif kind == "run":
                            return _run_record(json.loads(data))
            except httpx.TransportError:
                pass
            # The stream ended before the run did: take it up again, for a while.
            now = loop.time()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since > RECONNECT_FOR_S:
                raise ServerError(
                    f"lost the server at {login.url} while following run {run_id}; it goes "
                    f"on there: conveyor run describe {run_id}",
                    retryable=True,
                )
            await asyncio.sleep(RECONNECT_DELAY_S)


def _artifact_ids(client: RemoteClient, run_id: str, steps: list[StepRecord]) -> dict[str, str]:
    """The artifact id of each output's digest, for the run and the runs it reused."""
    found: dict[str, str] = {}
    runs = [run_id, *{s.cached_from for s in steps if s.cached_from}]
    for run in runs:
        artifacts: list[ArtifactRecord] = client.list_artifacts(run_id=run, limit=10_000)
        for artifact in artifacts:
            found.setdefault(artifact.ref.digest, artifact.id)
    return found


def leaf_outputs(client: RemoteClient, run_id: str, steps: list[StepRecord]) -> dict[str, Any]:
    """The small JSON and str outputs of the run's last steps, loaded through the server."""
    used = {up for s in steps for up in s.upstream}
    chosen = [
        (f"{record.name}.{output}", ref)
        for record in steps
        if record.name not in used and record.status in (StepStatus.COMPLETED, StepStatus.CACHED)
        for output, ref in record.outputs.items()
        if ref.size <= PREVIEW_BYTES and ref.materializer in ("json", "str")
    ]
    if not chosen:
        return {}
    ids = _artifact_ids(client, run_id, steps)
    return {
        name: client.load_artifact(ids[ref.digest]) for name, ref in chosen if ref.digest in ids
    }


class RemoteRunHandle(RunHandle):
    """A finished run of the server: its outputs are loaded through the server."""

    def __init__(self, record: RunRecord, steps: list[StepRecord], home: Home) -> None:
        super().__init__(record, steps)
        self._home = home

    def _load(
        self, record: StepRecord, output: str, *, allow_pickle: bool, trust: Sequence[str]
    ) -> Any:
        with RemoteClient(self._home) as client:
            ids = _artifact_ids(client, self.id, list(self.steps.values()))
            digest = record.outputs[output].digest
            if digest not in ids:
                raise ConveyorError(f"the server lists no artifact of {record.name!r}'s {output!r}")
            return client.load_artifact(ids[digest], allow_pickle=allow_pickle, trust=trust)


async def follow_or_cancel(
    client: RemoteClient, run_id: str, on_step: StepHandler, say: Callable[[str], None], why: str
) -> RunRecord:
    """``follow``; interrupted (Ctrl+C), cancel the run on the server first."""
    try:
        return await follow(client, run_id, on_step)
    except asyncio.CancelledError:
        say(f"Interrupted: cancelling run {run_id}")
        try:
            record = await asyncio.to_thread(client.cancel_run, run_id, why)
        except ConveyorError as exc:
            say(f"The cancellation was not taken: {exc}")
        else:
            if record.status in FINISHED_RUN_STATUSES:
                say(f"Run {run_id} is {record.status.value}")
        raise


def run_remote(
    definition: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    stack: str | None = None,
    retry_of: str | None = None,
    say: Callable[[str], None],
) -> RemoteRunHandle:
    """Call a pipeline on a logged-in home: compiled here, run on the server, waited for."""
    from conveyor.service.blocking import run_to_end

    spec, definitions = definition.compile(*args, **kwargs)
    home = Home.resolve()
    with RemoteClient(home) as client:
        run = submit(client, spec, definitions, stack=stack, retry_of=retry_of)

        async def main() -> RunRecord:
            why = "interrupted (Ctrl+C in the calling Python)"
            return await follow_or_cancel(client, run.id, lambda change: None, say, why)

        record = run_to_end(main)
        return RemoteRunHandle(record, client.get_steps(record.id), home)
