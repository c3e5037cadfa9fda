"""Pieces of the rabbitmq flavor that need no broker: config rules, topology, watchdog."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.contracts import ComponentType, Topology, ValidationError
from conveyor.workers.broker_rabbitmq import _safe_url
from conveyor.workers.flavors import get_flavor
from conveyor.workers.process import watch_consumers
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.rabbitmq_topology import definitions, queue_arguments, work_queues


def test_a_step_timeout_must_be_below_the_broker_consumer_timeout() -> None:
    flavor = get_flavor(ComponentType.ORCHESTRATOR, "rabbitmq")
    with pytest.raises(ValidationError, match=r"step_timeout_s.*consumer_timeout"):
        flavor.validate({"step_timeout_s": 3600})
    config = flavor.validate({"consumer_timeout_s": 7200, "step_timeout_s": 3600})
    assert isinstance(config, RabbitMQOrchestratorConfig) and config.step_timeout_s == 3600
    # The delivery of a step may have waited for a slot as a sibling for up to a second,
    # then run the steps before it in a chain for up to another.
    with pytest.raises(ValidationError, match=r"at least 2s below the broker's consumer_t"):
        flavor.validate({"consumer_timeout_s": 7200, "step_timeout_s": 7198.5})
    assert flavor.validate({"consumer_timeout_s": 7200, "step_timeout_s": 7197.5})


def test_the_url_is_a_secret_and_never_logged_with_its_password() -> None:
    config = RabbitMQOrchestratorConfig(url="amqp://user:s3cret@host:5672/vh")  # type: ignore[arg-type]
    assert "s3cret" not in repr(config)
    assert _safe_url(config.url.get_secret_value()) == "amqp://user:***@host:5672/vh"


def test_topology_names_come_from_the_stack_and_prefix() -> None:
    topology = Topology(stack="prod", prefix="acme")
    assert work_queues(topology, ["gpu"]) == [
        "acme.prod.runs",
        "acme.prod.events",
        "acme.prod.steps.default",
        "acme.prod.steps.gpu",
    ]
    document = definitions(topology, ["gpu"])
    queues = {q["name"]: q for q in document["queues"]}
    assert set(queues) == {*work_queues(topology, ["gpu"]), "acme.prod.dead"}
    for name in work_queues(topology, ["gpu"]):
        assert queues[name]["durable"] and queues[name]["arguments"] == queue_arguments(topology)
    assert queue_arguments(topology) == {"x-dead-letter-exchange": "acme.prod.dlx"}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in document["bindings"]}
    assert ("acme.prod", "acme.prod.steps.gpu", "acme.prod.steps.gpu") in bindings
    assert ("acme.prod.dlx", "acme.prod.dead", "") in bindings


async def test_the_watchdog_fires_only_after_zero_consumers_for_long_enough() -> None:
    counts = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    seen: list[int] = []

    def count() -> int:
        value = counts.pop(0) if counts else 0
        seen.append(value)
        return value

    await asyncio.wait_for(watch_consumers(count, limit_s=0.025, every_s=0.01), timeout=5)
    # It did not fire on the first zero, which consumers came back from.
    assert seen[:4] == [1, 1, 0, 1] and len(seen) >= 6

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(watch_consumers(lambda: 1, limit_s=0.01, every_s=0.01), 0.2)
