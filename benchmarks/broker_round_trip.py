"""What Conveyor's RabbitMQ broker layer adds to a broker round trip, against bare aio-pika.

Two processes on one RabbitMQ, one message in flight at a time: this one publishes a step
message, the other consumes it, publishes a completion and acks; this one consumes the
completion. That is the two broker hops of a chain step with nothing else in it. Two
systems, interleaved round by round:

- ``aiopika``: plain aio-pika, as ``peers.py``'s floor (persistent, publisher confirms);
- ``conveyor-broker``: ``RabbitMQBroker`` on a stack's topology (persistent, confirmed,
  mandatory, dead-lettering queues), carrying real ``StepReady`` and ``StepSucceeded``
  events, parsed and checked on receipt as the controller and a worker do.

A chain step on a ``rabbitmq`` stack costs this round trip plus the controller's decision
and commit and the worker's step (``hops.py`` times each). Prints the median round trip of
each system per round and over all rounds.

    python benchmarks/broker_round_trip.py [--rounds 5] [--messages 400] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from rabbitmq import delete_topology

from conveyor.contracts import (
    Delivery,
    StepReady,
    StepSpec,
    StepSucceeded,
    Topology,
    WorkerFacts,
)
from conveyor.service.logs import configure_logging
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig

WARM_UP = 50
"""Round trips of each round that are not counted."""


# --- bare aio-pika -----------------------------------------------------------------------


async def aiopika_echo(url: str, prefix: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2)
        exchange = await channel.get_exchange(prefix)
        queue = await channel.get_queue(f"{prefix}.steps")

        async def on_step(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            body = aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(body, routing_key=f"{prefix}.done")
            await message.ack()

        await queue.consume(on_step)
        print("ready", flush=True)
        await asyncio.Future()


async def aiopika_round_trips(url: str, n: int) -> list[float]:
    prefix = f"trip-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(prefix, durable=True)
        queues = []
        for name in ("steps", "done"):
            queue = await channel.declare_queue(f"{prefix}.{name}", durable=True)
            await queue.bind(exchange, f"{prefix}.{name}")
            queues.append(queue)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_done(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            arrived.put_nowait(time.perf_counter())

        tag = await queues[1].consume(on_done)
        body = json.dumps({"run": uuid.uuid4().hex, "step": 1, "fn": "bump", "args": [1]})

        async def send() -> None:
            message = aio_pika.Message(
                body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, routing_key=f"{prefix}.steps")

        try:
            return await _timed(("--aiopika-echo", url, prefix), send, arrived, n)
        finally:
            await queues[1].cancel(tag)
            for queue in queues:
                await queue.delete(if_unused=False, if_empty=False)
            await exchange.delete()


# --- Conveyor's broker layer -------------------------------------------------------------


def _broker(url: str, stack: str) -> RabbitMQBroker:
    topology = Topology(stack=stack, prefix="trip")
    return RabbitMQBroker(topology, RabbitMQOrchestratorConfig(url=url))


async def conveyor_echo(url: str, stack: str) -> None:
    broker = _broker(url, stack)
    await broker.start()
    facts = WorkerFacts(worker="round-trip", pid=0)

    async def on_step(delivery: Delivery) -> None:
        ready = delivery.event
        assert isinstance(ready, StepReady)
        done = StepSucceeded(
            run_id=ready.run_id,
            step=ready.step.name,
            attempt=ready.attempt,
            duration_s=0.0,
            by=facts,
        )
        await broker.publish([done])
        await delivery.ack()

    await broker.consume(broker.topology.step_queue("default"), on_step, prefetch=2)
    print("ready", flush=True)
    await asyncio.Future()


async def conveyor_round_trips(url: str, n: int) -> list[float]:
    stack = f"s{uuid.uuid4().hex[:8]}"
    broker = _broker(url, stack)
    await broker.start()
    try:
        await broker.ensure_queue(broker.topology.step_queue("default"))
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_done(delivery: Delivery) -> None:
            arrived.put_nowait(time.perf_counter())
            await delivery.ack()

        await broker.consume(broker.topology.events_queue, on_done, prefetch=16)
        run_id = uuid.uuid4().hex
        spec = StepSpec(name="bump_7", ref="overhead:bump", inputs={})

        async def send() -> None:
            await broker.publish([StepReady(run_id=run_id, step=spec, attempt=1)])

        return await _timed(("--conveyor-echo", url, stack), send, arrived, n)
    finally:
        await broker.stop()
        await delete_topology(url, broker.topology.prefix, broker.topology.stack)


# --- both ----------------------------------------------------------------------------------


async def _timed(
    echo: tuple[str, ...],
    send: Callable[[], Awaitable[None]],
    arrived: asyncio.Queue[float],
    n: int,
) -> list[float]:
    """Start the echo process, then ``n`` round trips one after another, in ms."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *echo, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        if (await process.stdout.readline()).strip() != b"ready":
            raise SystemExit(f"the echo process of {echo[0]} did not start")
        trips = []
        for _ in range(n + WARM_UP):
            began = time.perf_counter()
            await send()
            trips.append((await arrived.get() - began) * 1000)
        return trips[WARM_UP:]
    finally:
        process.kill()
        await process.wait()


SYSTEMS: dict[str, Callable[[str, int], Awaitable[list[float]]]] = {
    "aiopika": aiopika_round_trips,
    "conveyor-broker": conveyor_round_trips,
}


async def main(args: argparse.Namespace) -> None:
    medians: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    for round_ in range(args.rounds):
        for name, measure in SYSTEMS.items():
            median = statistics.median(await measure(args.url, args.messages))
            medians[name].append(median)
            if args.json:
                print(json.dumps({"system": name, "round": round_, "median_ms": round(median, 3)}))
            else:
                print(f"round {round_}: {name:<16} {median:7.3f} ms")
    for name, values in medians.items():
        overall = round(statistics.median(values), 3)
        if args.json:
            print(json.dumps({"system": name, "round": "all", "median_ms": overall}))
        else:
            spread = f"{min(values):.3f}-{max(values):.3f}"
            print(f"{name:<16} median of rounds {overall:7.3f} ms ({spread})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--aiopika-echo":
        asyncio.run(aiopika_echo(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--conveyor-echo":
        configure_logging("WARNING")
        asyncio.run(conveyor_echo(sys.argv[2], sys.argv[3]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--messages", type=int, default=400, help="timed round trips a round")
        parser.add_argument("--json", action="store_true", help="one JSON object per line")
        arguments = parser.parse_args()
        configure_logging("WARNING")
        asyncio.run(main(arguments))
