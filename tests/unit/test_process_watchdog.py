"""The process watchdog: deaf while connected ends the process; a broker that is down does
not, unless it stays down past reconnect_timeout_s. And a patient start that gives up."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.contracts import Topology
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.process import EXIT_BROKER_DOWN, EXIT_DEAF, watch_consumers
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.rabbitmq_errors import BrokerUnavailable
from tests.subprocesses import free_port

TICK = 0.01


async def test_connected_without_a_consumer_for_the_limit_is_deaf() -> None:
    code = await asyncio.wait_for(watch_consumers(lambda: 0, 0.05, every_s=TICK), 10)
    assert code == EXIT_DEAF


async def test_a_broker_that_is_down_is_waited_for_and_deafness_counts_from_reconnection() -> None:
    down = True
    watchdog = asyncio.create_task(
        watch_consumers(
            lambda: 0, 0.2, unreachable_for=lambda: 60.0 if down else None, every_s=TICK
        )
    )
    await asyncio.sleep(0.5)  # more than twice the limit, all of it down
    assert not watchdog.done()
    down = False
    assert await asyncio.wait_for(watchdog, 10) == EXIT_DEAF


async def test_a_broker_down_past_the_reconnect_timeout_ends_the_process() -> None:
    watchdog = watch_consumers(
        lambda: 1, 0.05, unreachable_for=lambda: 3.0, down_limit_s=2.0, every_s=TICK
    )
    assert await asyncio.wait_for(watchdog, 10) == EXIT_BROKER_DOWN


def _broker(**config: object) -> RabbitMQBroker:
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"  # nothing listens there
    settings = RabbitMQOrchestratorConfig.model_validate(
        {"url": url, "reconnect_interval_s": 0.02, "reconnect_max_interval_s": 0.05, **config}
    )
    return RabbitMQBroker(Topology(stack="watchdog-test"), settings)


async def test_a_patient_start_gives_up_after_reconnect_timeout_s() -> None:
    broker = _broker(reconnect_timeout_s=0.3)
    with pytest.raises(BrokerUnavailable) as raised:
        await asyncio.wait_for(broker.start_patiently(), 30)
    message = str(raised.value)
    assert "did not answer for" in message and "reconnect_timeout_s is 0.3" in message
    assert "secret" not in message and "guest:***@127.0.0.1" in message
    await broker.stop()


async def test_a_patient_start_ends_when_asked_to_stop() -> None:
    broker = _broker()
    stop = asyncio.Event()
    waiting = asyncio.create_task(broker.start_patiently(stop))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    stop.set()
    assert await asyncio.wait_for(waiting, 10) is False
    await broker.stop()
