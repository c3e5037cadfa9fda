"""What a command says while it waits for a broker: only once the wait is long, and never a
broker's credentials."""

from __future__ import annotations

import time

import pytest

from conveyor.contracts import ComponentSpec, ComponentType
from conveyor.service.cli.output import noted_if_slow
from conveyor.workers.stack_probes import broker_address


def test_a_quick_call_says_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    with noted_if_slow("waiting for the broker", after_s=30):
        pass
    assert capsys.readouterr().err == ""


def test_a_slow_call_says_what_it_waits_for_once(capsys: pytest.CaptureFixture[str]) -> None:
    said = ""
    with noted_if_slow("waiting for the broker", after_s=0.01):
        deadline = time.monotonic() + 10
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
            said += capsys.readouterr().err
    assert said == "waiting for the broker\n"


def test_the_broker_is_named_without_its_credentials() -> None:
    def orchestrator(flavor: str, **config: str) -> ComponentSpec:
        return ComponentSpec(
            id="c1", type=ComponentType.ORCHESTRATOR, name="o", flavor=flavor, config=config
        )

    rabbitmq = orchestrator("rabbitmq", url="amqp://bob:s3cret@mq.example:5671/prod")
    assert broker_address(rabbitmq) == "mq.example:5671/prod"
    # As a server sends it to a client: the password masked.
    assert broker_address(orchestrator("rabbitmq", url="amqp://bob:****@mq.example/")) == (
        "mq.example:5672/"
    )
    assert broker_address(orchestrator("local")) is None
    assert broker_address(orchestrator("rabbitmq", url="http://not-amqp/")) is None
