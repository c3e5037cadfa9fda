"""Renaming or deleting a rabbitmq stack while its controller and workers still run: their
queues carry the stack's name, so they would go on consuming the old ones and every run on
the new name would wait for ever. Refused until they stop. Real RabbitMQ, real processes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from conveyor.contracts import ConflictError, StackSpec, Topology
from conveyor.service.api import create_app
from conveyor.service.client import Client
from conveyor.service.context import Services
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.process import rabbitmq_config
from conveyor.workers.stack_probes import queue_names
from tests.conftest import conveyor_cli
from tests.integration.api_helpers import BASE_URL
from tests.integration.rabbitmq_support import (
    PIPELINES,
    STACK,
    Process,
    Processes,
    markers,
    processes,
    register_stack,
    vhost,
    wait_until,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.subprocesses import free_port

__all__ = ["markers", "processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

NEW = "lab"
REMINDER = f"Start its controller and workers with --stack {NEW}"


async def _renamed_over_http(home: Path) -> httpx.Response:
    app = create_app(home, stack="default")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as api:
            return await api.post(f"/api/stacks/{STACK}/rename", json={"new_name": NEW})


def _stop(process: Process) -> None:
    process.send(signal.SIGTERM)
    assert process.wait() == 0, process.output()


def test_a_stack_is_renamed_only_once_its_controller_and_worker_stopped(
    vhost: str, home: Path, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    worker = processes.worker("w1")

    refused = conveyor_cli("stack", "rename", STACK, NEW)
    assert refused.returncode != 0, refused.stdout
    said = " ".join((refused.stdout + refused.stderr).split())
    for consumer in ("runs", "events", "steps.default"):
        assert f"1 on conveyor.{STACK}.{consumer}" in said, said
    assert f"stop them, rename it, then start them with --stack {NEW}" in said, said
    # The SDK and the HTTP API are told the same.
    with Client() as client, pytest.raises(ConflictError, match=r"1 on conveyor\.prod\.runs"):
        client.rename_stack(STACK, NEW)
    answer = asyncio.run(_renamed_over_http(home))
    assert answer.status_code == 409 and "stop them, rename it" in answer.text, answer.text
    # Nor deleted while they run (once another stack is active).
    assert conveyor_cli("stack", "set", "default").returncode == 0
    deleted = conveyor_cli("stack", "delete", STACK, "-y")
    assert deleted.returncode != 0, deleted.stdout
    assert "stop them, then delete it" in " ".join(deleted.stderr.split()), deleted.stderr
    with Client() as client:
        assert [s.name for s in client.list_stacks()] == ["default", STACK]

    _stop(controller)
    _stop(worker)
    renamed = conveyor_cli("stack", "rename", STACK, NEW)
    assert renamed.returncode == 0, renamed.stderr
    assert f"Renamed stack '{STACK}' to '{NEW}'" in renamed.stdout + renamed.stderr
    assert REMINDER in renamed.stdout + renamed.stderr

    # Started on the new name, they take its next run to the end.
    processes.start("controller2", "controller", "start", "--stack", NEW).wait_for_log(
        "controller started"
    )
    processes.start("w2", "worker", "start", "--stack", NEW, "--name", "w2").wait_for_log(
        "worker started"
    )
    ran = conveyor_cli("pipeline", "run", f"{PIPELINES}:small", "--stack", NEW, timeout=90)
    assert ran.returncode == 0, ran.stdout + ran.stderr + processes.dump()
    assert "plus.output = 101" in ran.stdout and "completed" in ran.stdout, ran.stdout


def test_a_worker_of_a_pool_the_orchestrator_does_not_list_keeps_its_stack_from_a_rename(
    vhost: str, tmp_path: Path, markers: Path, processes: Processes
) -> None:
    """A worker started with ``--pool gpu`` on a stack whose orchestrator lists no pools:
    its queue is found through the runs that used the pool, as the others' are."""
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    worker = processes.worker("w1")
    gpu = processes.worker("w-gpu", "--pool", "gpu")
    ran = conveyor_cli("pipeline", "run", f"{PIPELINES}:pooled", timeout=90)
    assert ran.returncode == 0, ran.stdout + ran.stderr + processes.dump()
    _stop(controller)
    _stop(worker)

    refused = conveyor_cli("stack", "rename", STACK, NEW)
    assert refused.returncode != 0, refused.stdout
    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"(1 on conveyor.{STACK}.steps.gpu)" in said, said
    assert conveyor_cli("stack", "set", "default").returncode == 0
    deleted = conveyor_cli("stack", "delete", STACK, "-y")
    assert "1 on conveyor.prod.steps.gpu" in " ".join(deleted.stderr.split()), deleted.stderr

    _stop(gpu)
    renamed = conveyor_cli("stack", "rename", STACK, NEW)
    assert renamed.returncode == 0, renamed.stderr


def test_a_stack_whose_broker_cannot_be_checked_is_not_renamed_but_may_be_deleted(
    tmp_path: Path,
) -> None:
    unreachable = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    asyncio.run(register_stack(unreachable, tmp_path / "artifacts"))
    refused = conveyor_cli("stack", "rename", STACK, NEW)
    assert refused.returncode != 0, refused.stdout
    said = " ".join(refused.stderr.split())
    assert "could not be checked" in said and "try again once the broker answers" in said, said
    with Client() as client:
        assert [s.name for s in client.list_stacks()] == ["default", STACK]
    # A broker gone for good does not keep its stack: nothing can reach a deleted one.
    assert conveyor_cli("stack", "set", "default").returncode == 0
    deleted = conveyor_cli("stack", "delete", STACK, "-y")
    assert deleted.returncode == 0, deleted.stderr
    said = " ".join(deleted.stderr.split())
    assert "stack deleted without checking that nothing consumes its queues" in said, said


def test_a_broker_that_does_not_answer_is_said_and_waited_for_once(
    vhost: str, tmp_path: Path
) -> None:
    """A broker host that drops the packets (a paused proxy) is waited for the probe's 5 s:
    the command says what it waits for, and what it did without an answer."""
    with TcpProxy() as proxy:
        asyncio.run(register_stack(proxy.url(vhost), tmp_path / "artifacts"))
        where = f"RabbitMQ at 127.0.0.1:{proxy.port}/{vhost.rsplit('/', 1)[1]}"
        waiting = (
            f"Waiting for {where} to answer (at most 5s): does anything still consume the "
            f"queues of stack '{STACK}'? Without an answer,"
        )
        proxy.pause()
        try:
            refused = conveyor_cli("stack", "rename", STACK, NEW)
            said = " ".join(refused.stderr.split())
            assert refused.returncode == 1, said
            assert f"{waiting} it is not renamed." in said, said
            assert f"({where} did not answer in 5s); try again once the broker answers" in said
            assert conveyor_cli("stack", "set", "default").returncode == 0
            before = proxy.accepted
            deleted = conveyor_cli("stack", "delete", STACK, "-y")
            said = " ".join(deleted.stderr.split())
            assert deleted.returncode == 0, said
            assert (
                f"{waiting} it can be deleted all the same, leaving its queues on the broker."
                in said
            ), said
            assert "stack deleted without checking that nothing consumes its queues" in said
            assert "its old queues stay on the broker (delete them there once it answers)" in said
            assert f"Deleted stack '{STACK}'." in said
            # Asked once: with --yes, no check before a question that is not asked.
            assert proxy.accepted == before + 1
        finally:
            proxy.resume()


def test_an_embedded_stack_is_renamed_without_a_broker_or_a_reminder(
    vhost: str, tmp_path: Path
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    renamed = conveyor_cli("stack", "rename", STACK, NEW)
    assert renamed.returncode == 0, renamed.stderr
    assert REMINDER in renamed.stdout + renamed.stderr
    assert conveyor_cli("stack", "copy", "default", "here").returncode == 0
    local = conveyor_cli("stack", "rename", "here", "there")
    assert local.returncode == 0, local.stderr
    assert "Start its controller" not in local.stdout + local.stderr


def test_the_queues_of_a_stack_whose_controller_runs_do_not_move_to_another_prefix(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    controller = processes.controller()
    assert (
        conveyor_cli(
            "orchestrator",
            "register",
            "moved",
            "--flavor",
            "rabbitmq",
            "--url",
            vhost,
            "--prefix",
            "elsewhere",
        ).returncode
        == 0
    )
    for change in (
        ("orchestrator", "update", "rmq", "--prefix=elsewhere"),
        ("stack", "update", STACK, "-o", "moved"),
    ):
        refused = conveyor_cli(*change)
        assert refused.returncode != 0, (change, refused.stdout)
        said = " ".join(refused.stderr.split())
        assert f"1 on conveyor.{STACK}.runs" in said, said
        assert "stop them, change it, then start them again with --stack prod" in said, said
    # Settings that leave the queues where they are need no stop.
    assert conveyor_cli("orchestrator", "update", "rmq", "--concurrency=3").returncode == 0
    # Once the controller stopped, the stack moves.
    _stop(controller)
    moved = conveyor_cli("stack", "update", STACK, "-o", "moved")
    assert moved.returncode == 0, moved.stderr


async def test_a_broker_that_does_not_answer_does_not_lock_the_store_during_a_rename(
    vhost: str, home: Path, tmp_path: Path
) -> None:
    with TcpProxy() as proxy:
        await register_stack(proxy.url(vhost), tmp_path / "artifacts", home=home)
        await asyncio.to_thread(proxy.pause)
        renamer, other = await Services.open(home), await Services.open(home)
        try:
            rename = asyncio.create_task(renamer.stacks.rename_stack(STACK, NEW))
            # Polled, not slept: the rename's check has connected to the silent broker.
            await asyncio.to_thread(
                wait_until, lambda: rename.done() or proxy.accepted > 0, "the broker asked", 10
            )
            assert not rename.done(), "the rename did not ask the broker"
            # Another writer of the store goes on, long before the broker's 5 s are up.
            await asyncio.wait_for(other.stacks.activate("default"), 2)
            assert not rename.done()
            with pytest.raises(ConflictError, match="did not answer in 5s"):
                await rename
            assert [s.name for s in await other.stacks.list_stacks()] == ["default", STACK]
        finally:
            await asyncio.to_thread(proxy.resume)
            await renamer.close()
            await other.close()


async def _on_broker(url: str) -> tuple[set[str], dict[str, int]]:
    """Which of the stack's exchanges (old and new name) and queues are on the broker, and
    each queue's messages."""
    import aio_pika
    from aio_pika.exceptions import ChannelClosed

    exchanges: set[str] = set()
    queues: dict[str, int] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        for stack in (STACK, NEW):
            topology = Topology(stack=stack)
            for name in topology.exchanges:
                channel = await connection.channel()
                try:
                    await channel.declare_exchange(name, passive=True)
                    exchanges.add(name)
                    await channel.close()
                except ChannelClosed:
                    pass
            for name in queue_names(topology, ["gpu"]):
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                    queues[name] = int(queue.declaration_result.message_count or 0)
                    await channel.close()
                except ChannelClosed:
                    pass
    return exchanges, queues


async def _declared(stack: StackSpec) -> None:
    """The stack's topology, as its controller and workers declare it."""
    broker = RabbitMQBroker.of_stack(stack.name, rabbitmq_config(stack))
    await broker.start()
    await broker.stop()


async def _declared_with_a_dead_letter(url: str, stack: StackSpec) -> None:
    """The stack's topology, and one message in its dead letters."""
    import aio_pika

    await _declared(stack)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}"), routing_key=Topology(stack=STACK).dead_letter_queue
        )


def test_a_renamed_or_deleted_stack_takes_its_empty_queues_with_it_and_keeps_its_dead_letters(
    vhost: str, tmp_path: Path
) -> None:
    stack = asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    asyncio.run(_declared_with_a_dead_letter(vhost, stack))
    old = Topology(stack=STACK)
    exchanges, queues = asyncio.run(_on_broker(vhost))
    assert queues[old.runs_queue] == 0 and queues[old.dead_letter_queue] == 1, queues
    assert old.exchange in exchanges, exchanges

    renamed = conveyor_cli("stack", "rename", STACK, NEW)
    assert renamed.returncode == 0, renamed.stderr
    said = " ".join(renamed.stderr.split())
    assert "old queues kept" in said and f"{old.dead_letter_queue} (1 message(s)" in said, said
    exchanges, queues = asyncio.run(_on_broker(vhost))
    # The dead letters stay for a person to read, with the exchange that routes to them.
    assert queues == {old.dead_letter_queue: 1}, queues
    assert exchanges == {old.dead_letter_exchange}, exchanges

    # The new name's queues, once declared, go with a delete of the stack; nothing warns.
    with Client() as client:
        asyncio.run(_declared(client.get_stack(NEW)))
    assert NEW in " ".join(asyncio.run(_on_broker(vhost))[1])
    assert conveyor_cli("stack", "set", "default").returncode == 0
    deleted = conveyor_cli("stack", "delete", NEW, "-y")
    assert deleted.returncode == 0 and "old queues" not in deleted.stderr, deleted.stderr
    assert asyncio.run(_on_broker(vhost)) == ({old.dead_letter_exchange}, queues)
