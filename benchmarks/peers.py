"""Conveyor beside what users would pick instead, on the same DAGs, interleaved in one run.

Three workloads of trivial steps (``overhead.py``'s ``source``, ``bump``, ``join``): a chain of
21, a fan-out of 100 and its join (102 steps), a chain of 101. Four systems:

- ``conveyor-embedded``: the default stack (in-process broker and workers, SQLite, a local
  artifact directory);
- ``conveyor-rabbitmq``: a rabbitmq stack with a controller process and one worker process;
- ``aiopika-floor``: the least a broker-based DAG runner can do: this process publishes each
  ready step (persistent, with confirms) carrying its input values, one plain aio-pika worker
  process computes it and publishes the result (persistent, confirmed) before its ack;
- ``celery``: Celery 5 on the same RabbitMQ, Redis results (127.0.0.1:6379), a prefork
  worker, JSON; chains as ``chain``, the fan-out as the source then a ``chord``.

Every worker takes 2 steps at once (``--concurrency``). Each round runs every workload on every
system once; the first round warms up and is dropped; medians are printed with the ratios.

    pip install -e '.[bench]'
    python benchmarks/peers.py [--rounds 7] [--concurrency 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import chain, fan_out  # noqa: E402
from rabbitmq import delete_topology, register, start, wait_for  # noqa: E402

from conveyor import Conveyor, RunStatus  # noqa: E402
from conveyor.service.logs import configure_logging  # noqa: E402

SYSTEMS = ("conveyor-embedded", "conveyor-rabbitmq", "aiopika-floor", "celery")
WORKLOADS = {"chain21": ("chain", 21), "fanout100": ("fanout", 100), "chain101": ("chain", 101)}
Measure = Callable[[str], Awaitable[float]]


# --- the DAG of a workload, for the floor ----------------------------------------------


def dag(workload: str) -> list[tuple[str, list[int]]]:
    """Each step's function and the steps it takes its inputs from, in order."""
    shape, n = WORKLOADS[workload]
    if shape == "chain":
        return [("source", [])] + [("bump", [i]) for i in range(n - 1)]
    return [("source", [])] + [("bump", [0]) for _ in range(n)] + [("join", list(range(1, n + 1)))]


FUNCTIONS: dict[str, Callable[..., int]] = {
    "source": lambda: 0,
    "bump": lambda x: x + 1,
    "join": lambda *xs: len(xs),
}


# --- the floor: bare aio-pika ------------------------------------------------------------


async def floor_worker(url: str, prefix: str, prefetch: int) -> None:
    """The floor's worker process: compute a step from the values it carries, publish, ack."""
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        exchange = await channel.get_exchange(prefix)
        queue = await channel.get_queue(f"{prefix}.steps")

        async def on_step(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            step = json.loads(message.body)
            value = FUNCTIONS[step["fn"]](*step["args"])
            body = json.dumps({"run": step["run"], "step": step["step"], "value": value})
            await exchange.publish(
                aio_pika.Message(body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=f"{prefix}.done",
            )
            await message.ack()

        await queue.consume(on_step)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.Future()


class Floor:
    """The floor's controller: publishes each step once its inputs are known."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url, self.concurrency = url, concurrency
        self.prefix = f"floor-{uuid.uuid4().hex[:8]}"
        self.waiting: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    async def __aenter__(self) -> Floor:
        self.connection = await aio_pika.connect_robust(self.url)
        channel = await self.connection.channel()
        self.exchange = await channel.declare_exchange(self.prefix, durable=True)
        self.queues = []
        for name in ("steps", "done"):
            queue = await channel.declare_queue(f"{self.prefix}.{name}", durable=True)
            await queue.bind(self.exchange, f"{self.prefix}.{name}")
            self.queues.append(queue)
        self.worker = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--floor-worker",
            self.url,
            self.prefix,
            str(self.concurrency),
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.worker.stdout is not None
        assert (await self.worker.stdout.readline()).strip() == b"ready"
        self.tag = await self.queues[1].consume(self._on_done)
        return self

    async def _on_done(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        done = json.loads(message.body)
        await message.ack()
        self.waiting[done["run"]].put_nowait(done)

    async def _publish(self, run: str, index: int, fn: str, args: list[int]) -> None:
        body = json.dumps({"run": run, "step": index, "fn": fn, "args": args}).encode()
        await self.exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=f"{self.prefix}.steps",
        )

    async def run(self, workload: str) -> float:
        steps, run = dag(workload), uuid.uuid4().hex
        dependents: dict[int, list[int]] = {}
        missing = {i: len(deps) for i, (_, deps) in enumerate(steps)}
        for i, (_, deps) in enumerate(steps):
            for dep in deps:
                dependents.setdefault(dep, []).append(i)
        values: dict[int, int] = {}
        arrived = self.waiting[run] = asyncio.Queue()
        started = time.perf_counter()
        await self._publish(run, 0, "source", [])
        while len(values) < len(steps):
            done = await arrived.get()
            values[done["step"]] = done["value"]
            ready = []
            for i in dependents.get(done["step"], []):
                missing[i] -= 1
                if missing[i] == 0:
                    fn, deps = steps[i]
                    ready.append(self._publish(run, i, fn, [values[d] for d in deps]))
            await asyncio.gather(*ready)
        del self.waiting[run]
        return time.perf_counter() - started

    async def __aexit__(self, *exc: object) -> None:
        await self.queues[1].cancel(self.tag)
        self.worker.kill()
        await self.worker.wait()
        for queue in self.queues:
            await queue.delete(if_unused=False, if_empty=False)
        await self.exchange.delete()
        await self.connection.close()


# --- Celery ------------------------------------------------------------------------------


class CeleryPeer:
    """A Celery worker of ``celery_tasks`` started for this run, and a client of it."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.queue = f"peers-{uuid.uuid4().hex[:8]}"
        os.environ.update(PEERS_AMQP_URL=url, PEERS_QUEUE=self.queue)
        self.concurrency = concurrency

    def __enter__(self) -> CeleryPeer:
        import celery_tasks  # configured by the environment set above

        self.tasks = celery_tasks
        self.log = tempfile.NamedTemporaryFile(prefix="celery-worker-", suffix=".log")
        self.worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "-P", "prefork"),
                *("-c", str(self.concurrency), "-Q", self.queue, "-l", "WARNING"),
                *("--without-mingle", "--without-gossip", "--without-heartbeat"),
            ],
            cwd=HERE,
            env={**os.environ, "PYTHONPATH": str(HERE), "C_FORCE_ROOT": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self.tasks.app.control.ping(timeout=1.0):
            if time.monotonic() > deadline or self.worker.poll() is not None:
                log = Path(self.log.name).read_text()
                raise SystemExit(f"the Celery worker did not answer a ping within 60 s:\n{log}")
        return self

    def run(self, workload: str) -> float:
        from celery import chain as celery_chain
        from celery import chord

        shape, n = WORKLOADS[workload]
        tasks = self.tasks
        started = time.perf_counter()
        if shape == "chain":
            result = celery_chain(tasks.source.s(), *[tasks.bump.s() for _ in range(n - 1)])()
            assert result.get(timeout=120) == n - 1
        else:
            root = tasks.source.delay().get(timeout=120)
            joined = chord(tasks.bump.s(root) for _ in range(n))(tasks.join.s())
            assert joined.get(timeout=120) == n
        return time.perf_counter() - started

    def __exit__(self, *exc: object) -> None:
        self.worker.terminate()
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
        with self.tasks.app.connection_for_write() as connection:
            connection.default_channel.queue_delete(self.queue)
            connection.default_channel.exchange_delete(self.queue)  # Celery named it after it
        # The remote-control exchanges that the ping declared: shared by every Celery app on
        # the broker, so only when nothing else is bound to them.
        for pidbox in ("celery.pidbox", "reply.celery.pidbox"):
            with (
                self.tasks.app.connection_for_write() as connection,
                contextlib.suppress(Exception),
            ):
                connection.default_channel.exchange_delete(pidbox, if_unused=True)
        self.log.close()


# --- Conveyor ----------------------------------------------------------------------------


async def conveyor_run(cv: Conveyor, workload: str) -> float:
    shape, n = WORKLOADS[workload]
    started = time.perf_counter()
    # The cache off: every round runs its steps, as the other systems do.
    run = await cv.submit(chain if shape == "chain" else fan_out, n=n, cache=False)
    record = await run.wait()
    if record.status is not RunStatus.COMPLETED:
        raise SystemExit(f"{workload}: run {record.id} {record.status}: {record.error}")
    return time.perf_counter() - started


# --- one run of everything ---------------------------------------------------------------


@dataclass
class Figure:
    system: str
    workload: str
    median_s: float
    samples: int


async def measure_all(args: argparse.Namespace) -> list[Figure]:
    prefix = f"peers{uuid.uuid4().hex[:8]}"
    seconds: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="conveyor-peers-") as home:
        os.environ["CONVEYOR_HOME"] = home
        await register(args.url, prefix, args.concurrency, Path(home) / "artifacts")
        env = {**os.environ, "CONVEYOR_LOG_LEVEL": "INFO", "PYTHONPATH": str(HERE)}
        env.pop("PYTHONASYNCIODEBUG", None)
        procs = [start("controller", "start", "--stack", "bench", env=env)]
        try:
            wait_for(procs[0], "controller started")
            procs.append(start("worker", "start", "--stack", "bench", env=env))
            wait_for(procs[1], "worker started")
            for proc in procs:
                assert proc.stderr is not None
                asyncio.get_running_loop().run_in_executor(None, proc.stderr.read)
            async with (
                Conveyor(home=home) as embedded,
                Conveyor(home=home, stack="bench") as rabbit,
                Floor(args.url, args.concurrency) as floor,
            ):
                with CeleryPeer(args.url, args.concurrency) as celery:
                    loop = asyncio.get_running_loop()
                    measures: dict[str, Measure] = {
                        "conveyor-embedded": lambda w: conveyor_run(embedded, w),
                        "conveyor-rabbitmq": lambda w: conveyor_run(rabbit, w),
                        "aiopika-floor": floor.run,
                        "celery": lambda w: loop.run_in_executor(None, celery.run, w),
                    }
                    for round_ in range(args.rounds + 1):
                        for workload in WORKLOADS:
                            for system in SYSTEMS:
                                took = await measures[system](workload)
                                if round_:  # round 0 warms everything up
                                    seconds.setdefault((system, workload), []).append(took)
                        print(f"round {round_} of {args.rounds} done", file=sys.stderr)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
            await delete_topology(args.url, prefix)
    return [
        Figure(system, workload, round(statistics.median(found), 4), len(found))
        for (system, workload), found in seconds.items()
    ]


def print_table(figures: list[Figure]) -> None:
    by = {(f.system, f.workload): f.median_s for f in figures}
    print(f"{'workload':<11}" + "".join(f"{s:>19}" for s in SYSTEMS) + "   vs celery  vs floor")
    for workload in WORKLOADS:
        ours = by["conveyor-rabbitmq", workload]
        cells = "".join(f"{by[s, workload]:>18.3f}s" for s in SYSTEMS)
        print(
            f"{workload:<11}{cells}"
            f"{ours / by['celery', workload]:>11.2f}x{ours / by['aiopika-floor', workload]:>9.2f}x"
        )
    print("(ratios: conveyor-rabbitmq's median over the other's; below 1 is faster)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--floor-worker":
        asyncio.run(floor_worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--concurrency", type=int, default=2, help="steps per worker at once")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds after a warm-up")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    results = asyncio.run(measure_all(arguments))
    if arguments.json:
        for figure in results:
            print(json.dumps(figure.__dict__))
    else:
        print_table(results)
