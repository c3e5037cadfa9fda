"""A broker that is down, for longer than the watchdog and the publish timeout, then back.

Controller, worker and ``pipeline run`` are real processes that reach RabbitMQ through
:mod:`tests.integration.tcp_proxy`. Stopping the proxy is the broker going down (every
connection reset, then nothing listens: connection refused); a new proxy on the same port
is the broker coming back. The stack's timeouts are short so that the outage outlasts them
in seconds: what must hold is that nobody exits, the run in flight completes without a
step running twice, and a run submitted afterwards completes.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from conveyor.contracts import RunStatus
from conveyor.service.client import Client
from tests.conftest import conveyor_cli
from tests.integration.api_helpers import serving
from tests.integration.rabbitmq_support import (
    PIPELINES,
    Process,
    Processes,
    assert_committed_once,
    markers,
    only_run,
    processes,
    rabbitmqctl,
    register_stack,
    release,
    run_id_in,
    starts,
    vhost,
    wait_until,
)
from tests.integration.tcp_proxy import TcpProxy

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

WATCHDOG_S = 3.0
PUBLISH_TIMEOUT_S = 3.0
# Longer than both: before the fix, both processes exited (3) after the watchdog's 3 s.
DOWN_S = WATCHDOG_S + PUBLISH_TIMEOUT_S + 3.0
FIRST_PAUSE_S = 0.2
MAX_PAUSE_S = 1.0
SHORT = {
    "watchdog_s": WATCHDOG_S,
    "publish_timeout_s": PUBLISH_TIMEOUT_S,
    "reconnect_interval_s": FIRST_PAUSE_S,
    "reconnect_max_interval_s": MAX_PAUSE_S,
}


class Broker:
    """RabbitMQ behind a proxy on one port, which a test takes down and brings back up."""

    def __init__(self) -> None:
        self._first = TcpProxy().start()
        self.proxy: TcpProxy | None = self._first
        self.port = self._first.port

    def url(self, vhost_url: str) -> str:
        """``vhost_url`` through the proxy's port (whether it is up or not)."""
        return self._first.url(vhost_url)

    def down(self) -> None:
        """Nothing listens any more: every connection is reset, new ones are refused."""
        proxy, self.proxy = self.proxy, None
        if proxy is not None:
            proxy.stop()

    def shut_down(self, vhost_url: str) -> None:
        """As RabbitMQ stopping: each connection is closed by the broker (320
        CONNECTION_FORCED), and new ones fail, until :meth:`up`."""
        assert self.proxy is not None
        self.proxy.refuse()
        name = unquote(urlsplit(vhost_url).path.lstrip("/"))
        rabbitmqctl("close_all_connections", "-p", name, "broker going down (test)")

    def up(self) -> None:
        if self.proxy is None:
            self.proxy = TcpProxy(port=self.port).start()
        else:
            self.proxy.admit()


@pytest.fixture
def broker(rabbitmq: str) -> Iterator[Broker]:
    """RabbitMQ through a proxy that a test can take down (requested before ``processes``,
    so stopped after them)."""
    running = Broker()
    try:
        yield running
    finally:
        running.down()


def _events(process: Process, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``process`` whose event is ``name``."""
    found = []
    for line in process.output().splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def _assert_alive(*running: Process) -> None:
    for process in running:
        assert process.alive, f"{process.label} exited:\n{process.output()[-3000:]}"


def _run_small(processes: Processes, value: int) -> None:
    result = conveyor_cli(
        "pipeline", "run", f"{PIPELINES}:small", "-p", f"value={value}", timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr + processes.dump()
    assert f"plus.output = {value + 100}" in result.stdout
    with Client() as client:
        record = client.get_run(run_id_in(result.stderr))
        assert record.status is RunStatus.COMPLETED
        assert_committed_once(client, record.id)


def test_a_broker_down_longer_than_watchdog_and_publish_timeout_stops_nobody(
    vhost: str, tmp_path: Path, markers: Path, broker: Broker, processes: Processes
) -> None:
    asyncio.run(register_stack(broker.url(vhost), tmp_path / "artifacts", **SHORT))
    controller = processes.controller()
    worker = processes.worker("w1")
    run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain")
    wait_until(lambda: [n for n, _ in starts(markers)] == ["seed", "gate"], "the gate to start")

    broker.shut_down(vhost)
    # The held step finishes while the broker is down: the worker holds its outcome, and
    # its publish gives up after publish_timeout_s.
    release(markers, "gate")
    time.sleep(DOWN_S)
    _assert_alive(controller, worker, run)
    assert _events(worker, "broker lost while handling; the message will be delivered again")
    for process in (controller, worker):
        assert _events(process, "lost the connection to RabbitMQ; reconnecting")
        tries = _events(process, "RabbitMQ still unreachable; reconnecting")
        assert [t["attempt"] for t in tries] == list(range(1, len(tries) + 1)), tries
        assert len(tries) >= 4, process.output()[-3000:]
        assert all(0 < t["retry_in_s"] <= MAX_PAUSE_S for t in tries), tries
        assert tries[0]["retry_in_s"] <= FIRST_PAUSE_S < tries[-1]["retry_in_s"], tries
        assert all("guest:***@" in t["url"] for t in tries)
        # aio-pika's own line per failed attempt shows it paused as told.
        told = {t["retry_in_s"] for t in tries}
        paused = re.findall(r"Reconnecting after ([0-9.]+) seconds", process.output())
        assert paused and {round(float(p), 2) for p in paused} <= told, (paused, told)

    broker.up()
    assert run.wait(90) == 0, processes.dump()
    with Client() as client:
        record = only_run(client)
        assert record.status is RunStatus.COMPLETED
        assert_committed_once(client, record.id)
    # The outcome held through the outage answered the StepReady delivered again.
    assert [n for n, _ in starts(markers)] == ["seed", "gate", "last"]
    assert _events(worker, "attempt delivered again; answering with its outcome")

    _run_small(processes, 7)
    _assert_alive(controller, worker)
    for process in (controller, worker):
        [back] = _events(process, "reconnected to RabbitMQ")
        assert back["down_for_s"] >= DOWN_S, back
        assert "no consumer for too long" not in process.output()


def test_processes_started_while_the_broker_is_down_wait_for_it(
    vhost: str, tmp_path: Path, markers: Path, broker: Broker, processes: Processes
) -> None:
    url = broker.url(vhost)
    asyncio.run(register_stack(url, tmp_path / "artifacts", **SHORT))
    broker.down()
    controller = processes.start("controller", "controller", "start", "--stack", "prod")
    worker = processes.start("w1", "worker", "start", "--stack", "prod", "--name", "w1")
    stopped = processes.start("w2", "worker", "start", "--stack", "prod", "--name", "w2")

    def waited(process: Process, attempts: int) -> bool:
        _assert_alive(process)
        return len(_events(process, "waiting for RabbitMQ")) >= attempts

    for process in (controller, worker, stopped):
        wait_until(lambda p=process: waited(p, 5), f"{process.label} to try 5 times", 60)
    # Stopped while it waits: at once, and cleanly.
    stopped.send(signal.SIGTERM)
    assert stopped.wait(30) == 0, stopped.output()

    broker.up()
    controller.wait_for_log("controller started")
    worker.wait_for_log("worker started")
    for process in (controller, worker):
        tries = _events(process, "waiting for RabbitMQ")
        assert [t["attempt"] for t in tries] == list(range(1, len(tries) + 1))
        assert all(0 < t["retry_in_s"] <= MAX_PAUSE_S for t in tries), tries
        assert tries[-1]["retry_in_s"] >= MAX_PAUSE_S / 2, "the pause grew to its cap"
        assert tries[0]["url"].startswith("amqp://guest:***@127.0.0.1:"), tries[0]
        assert ":guest@" not in process.output()
    _run_small(processes, 3)
    _assert_alive(controller, worker)


async def test_healthz_reports_the_broker_down_then_healthy_again(
    vhost: str, tmp_path: Path, home: Path, broker: Broker
) -> None:
    """The server's /healthz: 503 with the broker's check failing while it is down."""
    await register_stack(broker.url(vhost), tmp_path / "artifacts", **SHORT)
    async with serving(home) as (_, api):
        healthy = await api.get("/healthz")
        assert healthy.status_code == 200, healthy.text
        assert healthy.json()["checks"]["broker"]["ok"]

        await asyncio.to_thread(broker.down)
        for _ in range(200):
            sick = await api.get("/healthz")
            if sick.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert sick.status_code == 503, sick.text
        report = sick.json()
        assert report["status"] == "unhealthy"
        check = report["checks"]["broker"]
        assert not check["ok"] and "unreachable" in check["detail"], check
        assert report["checks"]["store"]["ok"]

        await asyncio.to_thread(broker.up)
        for _ in range(400):
            again = await api.get("/healthz")
            if again.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "ok"


def test_a_controller_publishing_when_the_broker_goes_down_backs_off_and_goes_on(
    vhost: str, tmp_path: Path, markers: Path, broker: Broker, processes: Processes
) -> None:
    """The controller has recorded a completion and waits for the confirm of the next
    StepReady when the broker goes down: its publish gives up after publish_timeout_s, it
    backs off (unhealthy) instead of dying, and publishes once the broker is back."""
    asyncio.run(register_stack(broker.url(vhost), tmp_path / "artifacts", **SHORT))
    with TcpProxy() as own:
        controller = processes.controller(CONVEYOR_AMQP_URL=own.url(vhost))
        worker = processes.worker("w1")
        run = processes.start("run", "pipeline", "run", f"{PIPELINES}:gated_chain")
        wait_until(lambda: [n for n, _ in starts(markers)] == ["seed", "gate"], "the gate")
        own.pause(to_client=False)  # what the controller sends stays in the proxy
        release(markers, "gate")
        with Client() as client:
            run_id = only_run(client).id

            def recorded() -> bool:
                return {s.name: s.status.value for s in client.get_steps(run_id)}[
                    "gated"
                ] == "completed"

            wait_until(recorded, "the controller to record the completion", 30)
        own.refuse()
        broker.shut_down(vhost)
        time.sleep(DOWN_S)
        _assert_alive(controller, worker, run)
        assert _events(controller, "controller unhealthy: backing off")

        own.resume()
        own.admit()
        broker.up()
        assert run.wait(90) == 0, processes.dump()
    with Client() as client:
        assert_committed_once(client, run_id)
    assert [n for n, _ in starts(markers)] == ["seed", "gate", "last"]
    _assert_alive(controller, worker)
    assert _events(controller, "controller healthy again")


def test_stopping_while_the_broker_is_down_does_not_wait_for_it(
    vhost: str, tmp_path: Path, broker: Broker, processes: Processes
) -> None:
    """SIGTERM during an outage stops a worker at once (exit 0); with reconnect_timeout_s,
    a controller gives up on its own (exit 5). Before, stopping waited for the broker: a
    process stayed in "stopping" until it came back."""
    give_up_s = 6.0
    asyncio.run(
        register_stack(
            broker.url(vhost),
            tmp_path / "artifacts",
            **SHORT,
            reconnect_timeout_s=give_up_s,
        )
    )
    controller = processes.controller()
    worker = processes.worker("w1")
    broker.shut_down(vhost)
    time.sleep(WATCHDOG_S + 1)
    _assert_alive(controller, worker)
    worker.send(signal.SIGTERM)
    assert worker.wait(15) == 0, worker.output()
    assert controller.wait(give_up_s + 15) == 5, controller.output()
    [gave_up] = _events(
        controller, "broker unreachable for too long; exiting (reconnect_timeout_s)"
    )
    assert gave_up["down_for_s"] >= give_up_s
