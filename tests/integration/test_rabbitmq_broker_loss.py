"""Losing the broker without stopping it: every connection goes through a TCP proxy.

Controller, worker and ``pipeline run`` are real processes connected to RabbitMQ through
:mod:`tests.integration.tcp_proxy`, which the test cuts (every connection reset at once) or
pauses (a blackhole, as in a network partition) while a step is held by its gate. What
must hold afterwards: every process is alive and consuming again (a robust connection that
reconnects but never consumes again is the classic failure), the broker counts their
consumers, the run completes, and no step ran or committed twice, even though the ack of the
held step's first delivery went to a channel that no longer exists.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from conveyor.contracts import DEFAULT_POOL, RunStatus, StepStatus, Topology
from conveyor.service.client import Client
from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import (
    PIPELINES,
    STACK,
    Process,
    Processes,
    assert_committed_once,
    markers,
    only_run,
    processes,
    register_stack,
    release,
    run_id_in,
    starts,
    vhost,
    wait_until,
)
from tests.integration.tcp_proxy import TcpProxy, tcp_proxy

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

TOPOLOGY = Topology(stack=STACK)
RECONNECTED = "reconnected to RabbitMQ"
# A process that thinks it has no consumer for this long exits (EXIT_DEAF): short enough
# that a consumer lost for good after a cut ends the process while the test still runs.
WATCHDOG_S = 5.0


@pytest.fixture
def proxy(rabbitmq: str) -> Iterator[TcpProxy]:
    """A TCP proxy to the test broker (requested before ``processes``: stopped after them)."""
    with tcp_proxy() as running:
        yield running


@pytest.fixture
def controller_proxy(rabbitmq: str) -> Iterator[TcpProxy]:
    """A second proxy, for the controller alone."""
    with tcp_proxy() as running:
        yield running


def _consumers(vhost_url: str) -> dict[str, int]:
    """Consumers of each queue of the virtual host, as the broker counts them."""
    name = unquote(urlsplit(vhost_url).path.lstrip("/"))
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", name, "name", "consumers"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts = {}
    for line in listed.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
    return counts


def _wait_consuming(vhost_url: str, workers: int) -> None:
    """Until the broker counts one consumer per controller queue and ``workers`` on steps."""
    expected = {
        TOPOLOGY.events_queue: 1,
        TOPOLOGY.runs_queue: 1,
        TOPOLOGY.step_queue(DEFAULT_POOL): workers,
    }
    seen: dict[str, int] = {}

    def consuming() -> bool:
        nonlocal seen
        counts = _consumers(vhost_url)
        seen = {queue: counts.get(queue, 0) for queue in expected}
        return seen == expected

    try:
        wait_until(consuming, "every queue to have its consumers again", 60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen}, expected {expected}") from None


def _wait_reconnected(process: Process, times: int) -> None:
    """Until ``process`` logged ``times`` reconnections in all (it must not exit meanwhile)."""

    def reconnected() -> bool:
        if not process.alive:
            raise AssertionError(f"{process.label} exited:\n{process.output()[-3000:]}")
        return process.output().count(RECONNECTED) >= times

    wait_until(reconnected, f"{process.label} to reconnect ({times})", 60)


def _assert_watchdog_sees_consumers(process: Process) -> None:
    """The consumer watchdog saw consumers again after each time it saw none."""

    def settled() -> bool:
        output = process.output()
        return output.count("no consumer: the broker") == output.count("consumers are back")

    # The watchdog looks once a second: give it a few looks, then it must agree.
    wait_until(settled, f"{process.label}'s watchdog to see its consumers again", 30)


def _assert_no_errors(process: Process) -> None:
    """No error of Conveyor's own in the log of a process that lost its broker.

    aio-pika and aiormq log the lost connection (a traceback of the reader included) in
    plain text; Conveyor's JSON events must say nothing worse than a warning.
    """
    output = process.output()
    for bad in ('"level": "error"', '"level": "critical"', "exception was never retrieved"):
        assert bad not in output, f"{process.label} logged {bad!r}:\n{output[-5000:]}"


def _run_small_through(processes: Processes, value: int) -> str:
    """Run the small pipeline (through the proxy, as the stack says); its output."""
    result = conveyor_cli(
        "pipeline", "run", f"{PIPELINES}:small", "-p", f"value={value}", timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr + processes.dump()
    assert f"plus.output = {value + 100}" in result.stdout
    return result.stderr  # where pipeline run says what it does, its run id first


def _started(markers: Path, name: str) -> int:
    return [n for n, _ in starts(markers)].count(name)


def test_connections_cut_while_a_step_runs_the_run_completes_and_nothing_runs_twice(
    vhost: str, tmp_path: Path, markers: Path, proxy: TcpProxy, processes: Processes
) -> None:
    asyncio.run(register_stack(proxy.url(vhost), tmp_path / "artifacts", watchdog_s=WATCHDOG_S))
    controller = processes.controller()
    worker = processes.worker("w1")
    # `pipeline run` goes through the proxy too: it loses its status follower in the cut.
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain")
    wait_until(lambda: _started(markers, "gate") == 1, "the gated step to start")

    assert proxy.cut() == 3, "controller, worker and pipeline run each had a connection"
    _wait_reconnected(controller, 1)
    _wait_reconnected(worker, 1)
    _wait_consuming(vhost, workers=1)
    # The held step's StepReady was unacked on the channel that is gone: the broker
    # delivers it again, and the worker, which still runs that attempt, does not start it.
    worker.wait_for_log("attempt delivered again")
    release(markers, "gate")
    assert run.wait(90) == 0, processes.dump()
    # The first delivery's ack went to the dead channel: a warning, not a crash.
    assert "ack on a closed channel" in worker.output()

    with Client() as client:
        record = only_run(client)
        assert record.status is RunStatus.COMPLETED
        assert_committed_once(client, record.id)
        [last] = [a for a in client.list_artifacts(run_id=record.id) if a.step_name == "plus"]
        assert client.load_artifact(last.id) == 111
    assert [n for n, _ in starts(markers)] == ["seed", "gate", "last"]

    # Still consuming, not only alive: a run submitted after the cut completes too.
    output = _run_small_through(processes, 7)
    with Client() as client:
        second = client.get_run(run_id_in(output))
        assert second.status is RunStatus.COMPLETED
        assert_committed_once(client, second.id)
    for process in (controller, worker):
        _assert_watchdog_sees_consumers(process)
        assert process.alive, process.output()[-3000:]
        _assert_no_errors(process)
    _wait_consuming(vhost, workers=1)


def test_connections_cut_three_times_during_a_fan_out_commit_each_step_once(
    vhost: str, tmp_path: Path, markers: Path, proxy: TcpProxy, processes: Processes
) -> None:
    asyncio.run(register_stack(proxy.url(vhost), tmp_path / "artifacts", watchdog_s=WATCHDOG_S))
    controller = processes.controller()
    workers = [processes.worker("w1"), processes.worker("w2")]
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_fan_out")
    wait_until(
        lambda: any(n.startswith("branch-") for n, _ in starts(markers)),
        "the first branch to start",
    )

    for _ in range(3):
        # Whatever is in flight at that moment (steps, completions, acks, a controller
        # batch, a reconnection still restoring) loses its connection.
        assert proxy.cut() >= 1
        time.sleep(1.0)  # paces the cuts; nothing below depends on where they fell
        for process in (controller, *workers):
            assert process.alive, process.output()[-3000:]
    for process in (controller, *workers):
        _wait_reconnected(process, 1)
    _wait_consuming(vhost, workers=2)
    # Every branch completed and was recorded, or the join would not start.
    wait_until(lambda: _started(markers, "join") >= 1, "the join to start", 90)
    release(markers, "join")
    assert run.wait(90) == 0, processes.dump()

    with Client() as client:
        record = only_run(client)
        assert record.status is RunStatus.COMPLETED
        assert_committed_once(client, record.id)
        [join] = [a for a in client.list_artifacts(run_id=record.id) if a.step_name == "gated_sum"]
        assert client.load_artifact(join.id) == 6 * 2
    names = [n for n, _ in starts(markers)]
    assert names.count("seed") == 1
    # A StepReady whose ack was lost is delivered again, maybe to the other worker while
    # the first still runs it (at least once); it still commits once, checked above.
    assert {f"branch-{i}" for i in range(6)} <= set(names)

    _run_small_through(processes, 3)
    for process in (controller, *workers):
        _assert_watchdog_sees_consumers(process)
        assert process.alive, process.output()[-3000:]
        _assert_no_errors(process)


def test_a_partition_while_a_step_finishes_the_run_completes_and_nothing_runs_twice(
    vhost: str, tmp_path: Path, markers: Path, proxy: TcpProxy, processes: Processes
) -> None:
    """A blackhole rather than a reset: nothing arrives, nothing is closed.

    With a heartbeat of 1 s both sides give up on a silent connection within seconds
    (aiormq after three missed heartbeats, about 6 s), instead of RabbitMQ's default 60 s.
    The held step finishes during the partition: its completion cannot be confirmed, so it
    is published again on the new connection and its StepReady, requeued by the broker,
    is answered from the outcome the worker remembers.
    """
    url = f"{proxy.url(vhost)}?heartbeat=1"
    # The watchdog must outlast the partition: a process without consumers for longer
    # exits on purpose (its supervisor restarts it), which is not what this test is about.
    asyncio.run(register_stack(url, tmp_path / "artifacts", watchdog_s=30))
    controller = processes.controller()
    worker = processes.worker("w1")
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain")
    wait_until(lambda: _started(markers, "gate") == 1, "the gated step to start")

    accepted = proxy.accepted
    proxy.pause()
    release(markers, "gate")
    # Controller, worker and `pipeline run` each notice the silence and connect again.
    wait_until(lambda: proxy.accepted >= accepted + 3, "every client to try a new connection", 60)
    with Client() as client:
        steps = {s.name: s.status for s in client.get_steps(only_run(client).id)}
        assert steps["gated"] is not StepStatus.COMPLETED, "nothing is heard in a partition"
    proxy.resume()

    assert run.wait(90) == 0, processes.dump()
    assert "publish interrupted; retrying on reconnect" in worker.output()
    assert "attempt delivered again" in worker.output()
    with Client() as client:
        record = only_run(client)
        assert record.status is RunStatus.COMPLETED
        assert_committed_once(client, record.id)
    assert [n for n, _ in starts(markers)] == ["seed", "gate", "last"]

    _run_small_through(processes, 5)
    for process in (controller, worker):
        _assert_watchdog_sees_consumers(process)
        assert process.alive, process.output()[-3000:]
        _assert_no_errors(process)
    _wait_consuming(vhost, workers=1)


def test_a_publish_waiting_for_its_confirm_when_the_connection_goes_silent_is_retried(
    vhost: str,
    tmp_path: Path,
    markers: Path,
    proxy: TcpProxy,
    controller_proxy: TcpProxy,
    processes: Processes,
) -> None:
    """The controller's connection goes silent while it waits for the broker's confirm.

    First a one-way partition: the controller hears the held step's completion, records
    it, and publishes the next StepReady, but nothing it sends arrives. Then it hears
    nothing either, and after three missed heartbeats aiormq gives the connection up,
    cancelling the pending confirmation. The publish must be retried on the new connection
    and the controller go on: alive and consuming but no longer processing is pitfall 4.
    """
    heartbeat = "?heartbeat=3"  # RabbitMQ gives up after 3 to 6 s, aiormq after 12 s
    asyncio.run(
        register_stack(f"{proxy.url(vhost)}{heartbeat}", tmp_path / "artifacts", watchdog_s=30)
    )
    controller = processes.controller(CONVEYOR_AMQP_URL=f"{controller_proxy.url(vhost)}{heartbeat}")
    processes.worker("w1")
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain")
    wait_until(lambda: _started(markers, "gate") == 1, "the gated step to start")

    controller_proxy.pause(to_client=False)
    release(markers, "gate")
    with Client() as client:
        run_id = only_run(client).id

        def recorded() -> bool:
            steps = {s.name: s.status for s in client.get_steps(run_id)}
            return steps["gated"] is StepStatus.COMPLETED

        wait_until(recorded, "the controller to record the completion", 30)
    accepted = controller_proxy.accepted
    controller_proxy.pause()
    wait_until(
        lambda: controller_proxy.accepted > accepted,
        "the controller to give its silent connection up",
        60,
    )
    controller_proxy.resume()

    assert run.wait(90) == 0, processes.dump()
    assert "publish interrupted; retrying on reconnect" in controller.output()
    with Client() as client:
        assert_committed_once(client, run_id)
    assert [n for n, _ in starts(markers)] == ["seed", "gate", "last"]
    _run_small_through(processes, 9)
    _assert_watchdog_sees_consumers(controller)
    assert controller.alive, controller.output()[-3000:]
    _assert_no_errors(controller)
    _wait_consuming(vhost, workers=1)
