"""Throughput of the rabbitmq stack against the raw aio-pika ceiling, measured in one run.

The workloads of ``overhead.py`` (a chain of 200, a fan-out of 1,000) run on a rabbitmq
stack with a controller process and two worker processes. In the same run, the ceiling:
as many bare messages as steps go through two plain aio-pika consumer processes (publish a
StepReady with confirms, consume it, publish a completion with confirms, ack), in the
shape of the workload (one at a time for the chain, all at once for the fan-out).

``peak_rss_mb`` is the largest peak resident memory among the stack's processes (the
controller and each worker), which are started afresh for each workload.

    python benchmarks/rabbitmq.py [--url AMQP_URL] [--workers 2] [--concurrency 4] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import Result, chain, fan_out, measure, report  # noqa: E402

from conveyor import Conveyor  # noqa: E402
from conveyor.contracts import ComponentType, Topology  # noqa: E402
from conveyor.service.context import Services  # noqa: E402
from conveyor.service.logs import configure_logging  # noqa: E402
from conveyor.workers.stack_probes import queue_names  # noqa: E402

WORKLOADS: list[tuple[str, Any, int]] = [("chain_200", chain, 200), ("fanout_1000", fan_out, 1000)]
BODY = b'{"type":"StepReady","padding":"' + b"x" * 600 + b'"}'


@dataclass
class Measured(Result):
    ceiling_steps_per_s: float = 0.0


# --- the ceiling: bare messages through plain aio-pika ---------------------------------


async def ceiling_worker(url: str, prefix: str, prefetch: int) -> None:
    """A consumer process of the ceiling: take a step, publish its completion, ack."""
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        exchange = await channel.get_exchange(prefix)
        queue = await channel.get_queue(f"{prefix}.steps")

        async def on_step(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await exchange.publish(
                aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=f"{prefix}.done",
            )
            await message.ack()

        await queue.consume(on_step)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.Future()


async def measure_ceiling(url: str, workers: int, prefetch: int, n: int, sequential: bool) -> float:
    """Steps per second of bare messages in the shape of a workload."""
    prefix = f"ceiling-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect_robust(url)
    procs: list[asyncio.subprocess.Process] = []
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(prefix, durable=True)
        steps = await channel.declare_queue(f"{prefix}.steps", durable=True)
        done = await channel.declare_queue(f"{prefix}.done", durable=True)
        await steps.bind(exchange, f"{prefix}.steps")
        await done.bind(exchange, f"{prefix}.done")
        try:
            for _ in range(workers):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--ceiling-worker",
                    url,
                    prefix,
                    str(prefetch),
                    stdout=asyncio.subprocess.PIPE,
                )
                procs.append(proc)
                assert (
                    proc.stdout is not None and (await proc.stdout.readline()).strip() == b"ready"
                )
            received = 0
            finished = asyncio.Event()
            arrived: asyncio.Queue[None] = asyncio.Queue()

            async def on_done(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal received
                await message.ack()
                received += 1
                arrived.put_nowait(None)
                if received == n:
                    finished.set()

            tag = await done.consume(on_done)

            def message() -> aio_pika.Message:
                return aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

            started = time.perf_counter()
            if sequential:
                for _ in range(n):
                    await exchange.publish(message(), routing_key=f"{prefix}.steps")
                    await arrived.get()
            else:
                await asyncio.gather(
                    *(exchange.publish(message(), routing_key=f"{prefix}.steps") for _ in range(n))
                )
                await finished.wait()
            seconds = time.perf_counter() - started
            await done.cancel(tag)
        finally:
            for proc in procs:
                proc.kill()
                await proc.wait()
            await steps.delete(if_unused=False, if_empty=False)
            await done.delete(if_unused=False, if_empty=False)
            await exchange.delete()
    return n / seconds


# --- the rabbitmq stack -----------------------------------------------------------------


async def register(url: str, prefix: str, concurrency: int, artifacts: Path) -> None:
    services = await Services.open()
    try:
        config = {"url": url, "prefix": prefix, "concurrency": concurrency}
        await services.stacks.register_component(
            ComponentType.ORCHESTRATOR, "bench-rmq", "rabbitmq", config
        )
        await services.stacks.register_component(
            ComponentType.ARTIFACT_STORE, "bench-store", "local", {"path": str(artifacts)}
        )
        await services.stacks.register_stack(
            "bench",
            {ComponentType.ORCHESTRATOR: "bench-rmq", ComponentType.ARTIFACT_STORE: "bench-store"},
        )
    finally:
        await services.close()


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "conveyor.service.cli.app", *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if text in line:
            return
    raise SystemExit(f"process exited before logging {text!r}")


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of process ``pid`` so far, in MB (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


@contextlib.contextmanager
def stack_processes(workers: int, env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    """A controller and ``workers`` worker processes of the bench stack, stopped after."""
    procs = [start("controller", "start", "--stack", "bench", env=env)]
    try:
        wait_for(procs[0], "controller started")
        for i in range(workers):
            procs.append(start("worker", "start", "--stack", "bench", "--name", f"w{i}", env=env))
            wait_for(procs[-1], "worker started")
        for proc in procs:
            # Nobody reads their logs from now on: let them go nowhere.
            assert proc.stderr is not None
            threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def delete_topology(url: str, prefix: str, stack: str = "bench") -> None:
    """Delete every queue and exchange the stack ``stack`` under ``prefix`` declared."""
    topology = Topology(stack=stack, prefix=prefix)
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        for queue in queue_names(topology, []):
            await channel.queue_delete(queue)
        for exchange in topology.exchanges:
            await channel.exchange_delete(exchange)


async def main(args: argparse.Namespace) -> list[Measured]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    results: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as home:
        os.environ["CONVEYOR_HOME"] = home
        await register(args.url, prefix, args.concurrency, Path(home) / "artifacts")
        env = {
            **os.environ,
            "CONVEYOR_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        env.pop("PYTHONASYNCIODEBUG", None)
        try:
            async with Conveyor(stack="bench") as cv:
                for name, definition, n in WORKLOADS:
                    with stack_processes(args.workers, env) as procs:
                        await measure(cv, "warm-up", chain, 20)
                        best = min(
                            [await measure(cv, name, definition, n) for _ in range(args.repeat)],
                            key=lambda r: r.seconds,
                        )
                        peak = max(peak_rss_mb(proc.pid) for proc in procs)
                    ceiling = max(
                        [
                            await measure_ceiling(
                                args.url,
                                args.workers,
                                args.concurrency,
                                best.steps,
                                sequential=name.startswith("chain"),
                            )
                            for _ in range(args.repeat)
                        ]
                    )
                    best.peak_rss_mb = peak
                    results.append(Measured(**asdict(best), ceiling_steps_per_s=round(ceiling, 1)))
        finally:
            await delete_topology(args.url, prefix)
    return results


def print_table(results: list[Measured]) -> None:
    print(
        f"{'workload':<14}{'steps':>7}{'seconds':>10}{'steps/s':>10}"
        f"{'overhead ms/step':>18}{'ceiling/s':>11}{'of ceiling':>12}{'peak MB':>9}"
    )
    for r in results:
        print(
            f"{r.workload:<14}{r.steps:>7}{r.seconds:>10.3f}{r.steps_per_s:>10.0f}"
            f"{r.overhead_ms_per_step:>18.3f}{r.ceiling_steps_per_s:>11.0f}"
            f"{r.steps_per_s / r.ceiling_steps_per_s:>11.0%}{r.peak_rss_mb:>9.0f}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--ceiling-worker":
        asyncio.run(ceiling_worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="steps per worker at once")
    parser.add_argument("--repeat", type=int, default=2, help="runs per workload; best kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    report(asyncio.run(main(arguments)), as_json=arguments.json, table=print_table)
