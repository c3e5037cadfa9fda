"""A client, controller and workers of different Conveyor releases on one rabbitmq stack.

A newer side's message may carry a field the older side does not know: the older side
dead-letters it, as before, and now also tells the run it belonged to, naming both versions,
so that nobody waits for ever. The newer side is ``newer_conveyor``: this release's command
with a field of a later release in its messages.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from conveyor import Conveyor
from conveyor.contracts import (
    ConveyorError,
    Event,
    RunFinished,
    RunProgress,
    RunRequested,
    RunStatus,
    StepStatus,
    StepStatusChanged,
    Topology,
    new_id,
)
from conveyor.service.client import Client
from conveyor.service.version import conveyor_version
from conveyor.workers.rabbitmq_topology import QUEUE_HEADER, REASON_HEADER, VERSION_HEADER
from tests.conftest import ROOT, conveyor_cli
from tests.integration.newer_conveyor import NEW_FIELD, NEWER_VERSION, TYPES_ENV
from tests.integration.rabbitmq_support import (
    PIPELINES,
    STACK,
    Processes,
    cancel_while_its_step_runs,
    markers,
    processes,
    register_stack,
    run_id_in,
    vhost,
    wait_until,
)
from tests.pipelines.rabbitmq_pipelines import small

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

NEWER = "tests.integration.newer_conveyor"
RETRIES = "tests/pipelines/retry_pipelines.py"
WAIT_S = 60


async def dead_letters(url: str) -> list[tuple[str, str, dict[str, object]]]:
    """(queue, reason, body) of each message in the stack's dead-letter queue, taken out."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(Topology(stack=STACK).dead_letter_queue, passive=True)
        letters = []
        while (message := await dead.get(fail=False)) is not None:
            await message.ack()
            headers = message.headers
            body = json.loads(message.body)
            letters.append((str(headers[QUEUE_HEADER]), str(headers[REASON_HEADER]), body))
    return letters


def failing_run(processes: Processes, target: str, *told: str) -> str:
    """Run ``target`` with this release's ``pipeline run``: it fails, saying each of
    ``told``; its run id."""
    result = conveyor_cli("pipeline", "run", target, timeout=WAIT_S)
    assert result.returncode == 1, result.stdout + result.stderr + processes.dump()
    for text in told:
        assert text in result.stderr, result.stderr
    return run_id_in(result.stderr)


def run_good_pipeline(processes: Processes) -> str:
    """Run a pipeline of this release to its end; its run id."""
    result = conveyor_cli("pipeline", "run", f"{PIPELINES}:small", timeout=WAIT_S)
    assert result.returncode == 0, result.stdout + result.stderr + processes.dump()
    return run_id_in(result.stderr)


def test_a_newer_clients_request_fails_its_run_naming_both_versions(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """The client is one release ahead of its stack's controller: its request carries a
    field the controller refuses. It used to wait for ever; now its run fails saying why."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    worker = processes.worker("w1")
    try:
        newer = subprocess.run(
            [sys.executable, "-m", NEWER, "pipeline", "run", f"{PIPELINES}:small"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the client still waits after {WAIT_S}s: {exc.stderr!r}") from None
    assert newer.returncode == 1, newer.stdout + newer.stderr
    error = newer.stderr
    for told in (
        "this controller cannot read the request",
        f"{NEW_FIELD}: Extra inputs are not permitted",  # the cause
        f"the client runs Conveyor {NEWER_VERSION}",
        f"this controller Conveyor {conveyor_version()}",
        f"upgrade this controller to Conveyor {NEWER_VERSION}",
    ):
        assert told in error, error
    run_id = run_id_in(error)
    with Client() as client:
        run = client.get_run(run_id)
        assert run.status is RunStatus.FAILED
        assert f"{NEW_FIELD}: Extra inputs are not permitted" in (run.error or "")

    [(queue, reason, body)] = asyncio.run(dead_letters(vhost))
    assert queue == Topology(stack=STACK).runs_queue
    assert body["run_id"] == run_id and f"{NEW_FIELD}: Extra inputs" in reason

    # The controller took the next request of this release as ever.
    good = run_good_pipeline(processes)
    with Client() as client:
        assert client.get_run(good).status is RunStatus.COMPLETED
    assert controller.alive and worker.alive


def test_a_newer_controllers_step_fails_on_a_worker_that_cannot_read_it(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """The controller is one release ahead of its workers: their StepReady carries a field
    the workers refuse. The run used to wait for ever for that step; now the worker fails
    the attempt (not to be retried: every worker of its release would refuse it too)."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    newer = processes.controller("newer-controller", module=NEWER)
    worker = processes.worker("w1")
    # Its one step may be retried once: the worker's failure says a retry cannot help.
    run_id = failing_run(
        processes,
        f"{RETRIES}:asks_later",
        "this worker cannot read the step",
        f"{NEW_FIELD}: Extra inputs are not permitted",
        f"the controller runs Conveyor {NEWER_VERSION}",
        f"this worker Conveyor {conveyor_version()}",
        f"upgrade this worker to Conveyor {NEWER_VERSION}",
    )
    with Client() as client:
        assert client.get_run(run_id).status is RunStatus.FAILED
        steps = {s.name: s for s in client.get_steps(run_id)}
    step = steps["rate_limited"]
    assert (step.status, step.attempt, step.max_retries) == (StepStatus.FAILED, 1, 1)
    assert step.worker == "w1"

    [(queue, reason, body)] = asyncio.run(dead_letters(vhost))
    assert queue == Topology(stack=STACK).step_queue("default")
    assert body["run_id"] == run_id and f"{NEW_FIELD}: Extra inputs" in reason

    # The same worker runs the steps of a controller of its own release.
    newer.kill()
    processes.controller()
    good = run_good_pipeline(processes)
    with Client() as client:
        assert {s.worker for s in client.get_steps(good)} == {"w1"}
    assert worker.alive


def test_a_newer_controllers_sibling_steps_fail_on_a_worker_that_cannot_read_them(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """Steps ready at once go to the workers a few to a message, as siblings of its first,
    each named only inside it. A worker that cannot read such a message used to fail its
    first step only, and the run waited for ever for the others; now it fails each."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller("newer-controller", module=NEWER)
    worker = processes.worker("w1")
    run_id = failing_run(processes, f"{PIPELINES}:roots", "this worker cannot read the step")
    with Client() as client:
        steps = {s.name: s for s in client.get_steps(run_id)}
    seeds = [s for name, s in steps.items() if name.startswith("seed")]
    assert len(seeds) == 24
    assert {(s.status, s.attempt) for s in seeds} == {(StepStatus.FAILED, 1)}
    assert steps["join_all"].status is StepStatus.SKIPPED

    letters = asyncio.run(dead_letters(vhost))
    assert all(body["type"] == "StepReady" for _, _, body in letters)
    carried = [len(body.get("siblings", [])) for _, _, body in letters]
    assert max(carried) > 0 and len(letters) + sum(carried) == 24
    assert worker.alive


def test_a_newer_controllers_run_cancellation_stops_its_steps_on_a_worker_that_cannot_read_it(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """The controller is one release ahead of its workers, and its AttemptsCancelled carries
    a field they refuse. A cancelled run's running step used to go on to its end; now the
    worker stops it (the message says the whole run), naming both releases."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    env = {TYPES_ENV: "AttemptsCancelled"}  # its steps this worker reads
    processes.controller("newer-controller", module=NEWER, **env)
    worker = processes.worker("w1")
    run_id = cancel_while_its_step_runs(markers, processes)
    with Client() as client:
        assert client.get_run(run_id).status is RunStatus.CANCELLED
    worker.wait_for_log("attempts stopped")
    output = worker.output()
    for told in (
        "cancellation unreadable; stopping the run's attempts",
        "this worker cannot read the cancellation",
        f"the controller runs Conveyor {NEWER_VERSION}",
        f"this worker Conveyor {conveyor_version()}",
        f"upgrade this worker to Conveyor {NEWER_VERSION}",
    ):
        assert told in output, output[-3000:]

    [(queue, reason, body)] = asyncio.run(dead_letters(vhost))
    assert queue == Topology(stack=STACK).control_exchange
    assert (body["type"], body["run_id"], body["attempts"]) == ("AttemptsCancelled", run_id, {})
    assert f"{NEW_FIELD}: Extra inputs" in reason
    assert worker.alive


async def publish_raw(url: str, queue: str, body: bytes, headers: dict[str, Any]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(body, headers=headers, message_id=new_id())
        await channel.default_exchange.publish(message, routing_key=queue)


def test_a_request_with_an_unknown_field_and_a_junk_version_fails_its_run(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    """Any AMQP client may send a request: one with a top-level field this release does not
    know, whose version header is not a version, fails its run without naming a version."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    request = json.loads(RunRequested(run_id=new_id(), pipeline="train").model_dump_json())
    request["priority"] = "high"
    junk = {VERSION_HEADER: "9.9; rm -rf / " + "x" * 10_000}
    runs = Topology(stack=STACK).runs_queue
    asyncio.run(publish_raw(vhost, runs, json.dumps(request).encode(), junk))

    with Client() as client:

        def recorded() -> bool:
            return any(r.id == request["run_id"] for r in client.list_runs())

        wait_until(recorded, "the run to be recorded", WAIT_S)
        run = client.get_run(request["run_id"])
    assert (run.status, run.pipeline) == (RunStatus.FAILED, "train")
    error = run.error or ""
    assert "this controller cannot read the request" in error
    assert "priority: Extra inputs are not permitted" in error
    assert "the client did not say its Conveyor release" in error and "rm -rf" not in error
    [(queue, reason, _)] = asyncio.run(dead_letters(vhost))
    assert queue == runs and "priority" in reason
    assert controller.alive


async def publish_status(url: str, run_id: str, body: dict[str, Any]) -> None:
    """Publish ``body`` as a status event of ``run_id``, as a newer controller would."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology(stack=STACK).status_exchange)
        headers: dict[str, Any] = {VERSION_HEADER: NEWER_VERSION}
        message = aio_pika.Message(json.dumps(body).encode(), headers=headers)
        await exchange.publish(message, routing_key=run_id)


async def test_a_client_that_cannot_read_its_runs_end_stops_waiting_naming_both_versions(
    vhost: str, tmp_path: Path
) -> None:
    """The stack is one release ahead of its client: a status event of the run carries a
    field the client does not know. A step change it cannot read only goes unseen; an end it
    cannot read would have been waited for for ever (the client's store does not hold the
    run: no controller of its store records it), so the wait ends naming both releases."""
    await register_stack(vhost, tmp_path / "artifacts")
    async with Conveyor(stack=STACK) as cv:
        run = await cv.submit(small)

        def newer(event: Event) -> dict[str, Any]:
            body = json.loads(event.model_dump_json())
            body[NEW_FIELD] = "eu-west"
            return body

        step_change = RunProgress(
            run_id=run.id,
            changes=[
                StepStatusChanged(run_id=run.id, step="plus", status=StepStatus.RUNNING, attempt=1)
            ],
        )
        await publish_status(vhost, run.id, newer(step_change))
        with pytest.raises(TimeoutError):  # still waiting for the end
            await run.wait(timeout=1.0)

        await publish_status(
            vhost, run.id, newer(RunFinished(run_id=run.id, status=RunStatus.COMPLETED))
        )
        with pytest.raises(ConveyorError) as caught:
            await run.wait(timeout=WAIT_S)
    error = str(caught.value)
    for told in (
        f"run {run.id} ended, but how is not known here",
        "this client cannot read the run's RunFinished",
        f"{NEW_FIELD}: Extra inputs are not permitted",
        f"the controller runs Conveyor {NEWER_VERSION}, this client Conveyor {conveyor_version()}",
        f"upgrade this client to Conveyor {NEWER_VERSION}",
    ):
        assert told in error, error


def test_a_newer_workers_report_fails_its_step_on_a_controller_that_cannot_read_it(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """A worker is one release ahead of its controller (upgraded first): its report of a
    step carries a field the controller refuses. The run used to wait for ever for that
    step; now the controller fails the attempt, not to be retried (the worker would report
    it so again), and goes on taking the reports it can read."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    newer = processes.start(
        "newer-w1", "worker", "start", "--stack", STACK, "--name", "newer-w1", module=NEWER
    )
    newer.wait_for_log("worker started")
    run_id = failing_run(
        processes,
        f"{PIPELINES}:small",
        "this controller cannot read the worker's StepSucceeded",
        f"{NEW_FIELD}: Extra inputs are not permitted",
        f"the worker runs Conveyor {NEWER_VERSION}, this controller Conveyor {conveyor_version()}",
        f"upgrade this controller to Conveyor {NEWER_VERSION}",
    )
    with Client() as client:
        steps = {s.name: s for s in client.get_steps(run_id)}
    # Failed at its first attempt although its retries were not used: none is tried again.
    assert (steps["seed"].status, steps["seed"].attempt) == (StepStatus.FAILED, 1)
    assert steps["plus"].status is StepStatus.SKIPPED

    [(queue, reason, body)] = asyncio.run(dead_letters(vhost))
    assert queue == Topology(stack=STACK).events_queue
    assert body["type"] == "StepSucceeded" and f"{NEW_FIELD}: Extra inputs" in reason

    # The controller takes the reports of a worker of its own release.
    newer.kill()
    processes.worker("w1")
    run_good_pipeline(processes)
    assert controller.alive


def test_a_newer_workers_reports_of_siblings_fail_their_steps_on_a_controller_that_cannot_read_them(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """The branches of a fan-out come to a worker a few to a message, and their reports go
    back together, one ``StepsDone``. From a newer worker, each report in it carries a field
    the controller refuses: the run used to wait for ever for those branches; now each
    attempt the message names is failed, not to be retried."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    newer = processes.start(
        "newer-w1",
        *("worker", "start", "--stack", STACK, "--name", "newer-w1"),
        env={TYPES_ENV: "StepsDone"},  # its lone reports this controller reads
        module=NEWER,
    )
    newer.wait_for_log("worker started")
    run_id = failing_run(
        processes,
        f"{PIPELINES}:wide",
        "this controller cannot read the worker's StepsDone",
        f"the worker runs Conveyor {NEWER_VERSION}, this controller Conveyor {conveyor_version()}",
    )
    with Client() as client:
        steps = {s.name: s for s in client.get_steps(run_id)}
    assert steps["seed"].status is StepStatus.COMPLETED
    branches = [s for name, s in steps.items() if name.startswith("plus")]
    failed = [s for s in branches if s.status is StepStatus.FAILED]
    assert len(branches) == 24 and len(failed) >= 2
    # Each failed at its first attempt: none is tried again, and none is left waiting.
    assert {(s.attempt, "StepsDone" in (s.error or "")) for s in failed} == {(1, True)}
    assert {s.status for s in branches} <= {StepStatus.FAILED, StepStatus.COMPLETED}
    assert steps["join_all"].status is StepStatus.SKIPPED

    letters = asyncio.run(dead_letters(vhost))
    assert letters and all(body["type"] == "StepsDone" for _, _, body in letters)
    assert sum(len(body["outcomes"]) for _, _, body in letters) == len(failed)
    assert all(f"{NEW_FIELD}: Extra inputs" in reason for _, reason, _ in letters)
    assert controller.alive
