"""A rabbitmq stack of real processes to inflict faults on, and what a campaign reads back.

One controller and N workers (``conveyor controller start`` / ``conveyor worker start``
subprocesses) on a virtual host of their own, every one of them connected through a
:class:`~tests.integration.tcp_proxy.TcpProxy`, so that the nemesis can cut or freeze
their broker connections while the broker itself stays up. The submitter and the checker
talk to the broker directly: their view is the client's, unaffected by the faults.

The stack acts as the processes' supervisor too: a process that exits without the nemesis
having killed it is recorded (an unplanned exit is a finding) and started again, as
Kubernetes or systemd would.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import structlog

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ArtifactRef,
    ArtifactStore,
    RunRecord,
    RunRequested,
    RunStatus,
    StepReady,
    Topology,
    encode_event,
    new_id,
    parse_event,
)
from conveyor.service.context import Services
from conveyor.workers.execution import load_artifact
from conveyor.workers.flavors import run_artifact_store
from conveyor.workers.rabbitmq_topology import REASON_HEADER
from tests.faults.checker import DeadLetter, RunOutcome, StepOutcome
from tests.integration.rabbitmq_support import STACK, Process, Processes, register_stack
from tests.integration.tcp_proxy import TcpProxy
from tests.pipelines.ledger_pipelines import LEDGER_ENV, PIPELINE

log = structlog.get_logger("conveyor.faults")

TOPOLOGY = Topology(stack=STACK)
STARTED_S = 60.0  # a process that does not say it started within this long fails the campaign
STOP_S = 30.0
SUPERVISE_EVERY_S = 1.0


@dataclass(frozen=True)
class UnplannedExit:
    label: str
    code: int | None
    at: float
    tail: str


class FaultStack:
    """A controller and ``workers`` worker processes of stack ``prod`` behind a TCP proxy.

    ``vhost_url`` is the broker's URL of a virtual host of this stack alone; ``workdir``
    holds the metadata store (``home``), the artifacts, the ledger and the process logs.
    """

    def __init__(
        self,
        vhost_url: str,
        workdir: Path,
        *,
        workers: int = 2,
        concurrency: int = 2,
        watchdog_s: float = 30.0,
        lease_s: float = 2.5,
    ) -> None:
        self.vhost_url = vhost_url
        self.workdir = workdir
        self.home = workdir / "home"
        self.artifacts = workdir / "artifacts"
        self.ledger = workdir / "ledger.txt"
        self.logs = workdir / "logs"
        self.worker_count = workers
        self.concurrency = concurrency
        self.watchdog_s = watchdog_s
        self.lease_s = lease_s
        self.proxy = TcpProxy(*_host_port(vhost_url))
        self.processes = Processes(self.logs)
        self.controller: Process | None = None
        self.workers: list[Process | None] = [None] * workers
        self.unplanned: list[UnplannedExit] = []
        self._killing: set[int] = set()  # pids the nemesis is killing on purpose
        self._replacing = asyncio.Lock()
        self._generation: dict[str, int] = {}
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"CONVEYOR_HOME": str(self.home), LEDGER_ENV: str(self.ledger)}

    # --- lifecycle ---

    async def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ledger.touch()
        await asyncio.to_thread(self.proxy.start)
        # A short lease makes a frozen worker lose its steps to another within seconds (its
        # AMQP heartbeat follows the lease, so a frozen connection fails as soon).
        await register_stack(
            self.proxy.url(self.vhost_url),
            self.artifacts,
            home=self.home,
            concurrency=self.concurrency,
            watchdog_s=self.watchdog_s,
            lease_s=self.lease_s,
            heartbeat_s=self.lease_s / 5,
        )
        self.controller = self._spawn_controller()
        await self._ready(self.controller, strict=True)
        for index in range(self.worker_count):
            worker = self.workers[index] = self._spawn_worker(index)
            await self._ready(worker, strict=True)
        self._supervisor = asyncio.create_task(self._supervise(), name="supervisor")

    async def stop(self) -> None:
        """Stop supervising, SIGTERM every process (SIGKILL after a while), stop the proxy."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        running = [p for p in (*self.workers, self.controller) if p is not None and p.alive]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send(signal.SIGCONT)  # a frozen process cannot hear SIGTERM
                process.send(signal.SIGTERM)
        for process in running:
            try:
                await asyncio.to_thread(process.wait, STOP_S)
            except AssertionError:
                log.warning("process did not stop on SIGTERM", process=process.label)
        self.processes.stop_all()
        await asyncio.to_thread(self.proxy.stop)

    async def __aenter__(self) -> FaultStack:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- processes ---

    def _label(self, base: str) -> str:
        generation = self._generation.get(base, 0) + 1
        self._generation[base] = generation
        return base if generation == 1 else f"{base}.{generation}"

    def _spawn_controller(self) -> Process:
        label = self._label("controller")
        return self.processes.start(label, "controller", "start", "--stack", STACK, env=self.env)

    def _spawn_worker(self, index: int) -> Process:
        label = self._label(f"w{index + 1}")
        return self.processes.start(
            label, "worker", "start", "--stack", STACK, "--name", label, env=self.env
        )

    async def _ready(self, process: Process, *, strict: bool) -> None:
        """Until ``process`` says it started; a replacement that exits instead is left to
        the supervisor (``strict=False``), a first start fails the campaign."""
        text = "controller started" if process.label.startswith("controller") else "worker started"
        try:
            await asyncio.to_thread(process.wait_for_log, text, STARTED_S)
        except AssertionError:
            if strict:
                raise
            log.warning("replacement did not start", process=process.label)

    def _unplanned(self, process: Process) -> None:
        code = process.proc.poll()
        tail = process.output()[-3000:]
        self.unplanned.append(UnplannedExit(process.label, code, time.time(), tail))
        log.warning("unplanned exit", process=process.label, code=code)

    async def _supervise(self) -> None:
        """Restart what exited without the nemesis killing it, as a supervisor would.

        A controller started right after a SIGKILL may be refused while the broker still
        holds the dead one's exclusive consumer; it exits, and is restarted here.
        """
        while True:
            await asyncio.sleep(SUPERVISE_EVERY_S)
            async with self._replacing:
                if self.controller is not None and self._exited(self.controller):
                    self._unplanned(self.controller)
                    self.controller = self._spawn_controller()
                for index, worker in enumerate(self.workers):
                    if worker is not None and self._exited(worker):
                        self._unplanned(worker)
                        self.workers[index] = self._spawn_worker(index)

    def _exited(self, process: Process) -> bool:
        return not process.alive and process.pid not in self._killing

    # --- what the nemesis does; each returns when the fault was lifted (time.time()) ---

    async def kill_controller(self) -> float:
        async with self._replacing:
            victim, self.controller = self.controller, None
            assert victim is not None
            return await self._kill_and_restart(victim)

    async def kill_worker(self, index: int) -> float:
        async with self._replacing:
            victim = self.workers[index]
            assert victim is not None
            self.workers[index] = None
            return await self._kill_and_restart(victim, index)

    async def _kill_and_restart(self, victim: Process, index: int | None = None) -> float:
        self._killing.add(victim.pid)
        with contextlib.suppress(ProcessLookupError):
            victim.send(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, STOP_S)
        lifted = time.time()
        if index is None:
            replacement = self.controller = self._spawn_controller()
        else:
            replacement = self.workers[index] = self._spawn_worker(index)
        await self._ready(replacement, strict=False)
        return lifted

    async def freeze_worker(self, index: int, hold_s: float) -> float:
        async with self._replacing:
            worker = self.workers[index]
            assert worker is not None
            return await _freeze(worker, hold_s)

    async def freeze_controller(self, hold_s: float) -> float:
        async with self._replacing:
            assert self.controller is not None
            return await _freeze(self.controller, hold_s)

    async def cut_broker(self) -> float:
        await asyncio.to_thread(self.proxy.cut)
        return time.time()

    async def freeze_broker(self, hold_s: float) -> float:
        await asyncio.to_thread(self.proxy.pause)
        try:
            await asyncio.sleep(hold_s)
        finally:
            await asyncio.to_thread(self.proxy.resume)
        return time.time()

    async def down_broker(self, hold_s: float) -> float:
        await asyncio.to_thread(self.proxy.down)
        try:
            await asyncio.sleep(hold_s)
        finally:
            await asyncio.to_thread(self.proxy.admit)
        return time.time()

    # --- what the checker reads ---

    async def runs(self) -> list[RunOutcome]:
        """Every run of the stack as recorded, with each completed step's output mark."""
        services = await Services.open(self.home)
        try:
            records = await services.runs.list_runs(limit=100_000)
            return [await _outcome(services, record) for record in records]
        finally:
            await services.close()

    async def completion_times(self) -> tuple[list[float], dict[str, float]]:
        """When the controller recorded each step output, and each completed run (time.time()).

        A step's own ``finished`` is the worker's clock at the end of its body; what counts
        for recovery is when the stack took note of it.
        """
        services = await Services.open(self.home)
        try:
            records = await services.runs.list_runs(limit=100_000)
            artifacts = await services.artifacts.list_artifacts(limit=1_000_000)
        finally:
            await services.close()
        runs = {
            r.id: r.finished.timestamp()
            for r in records
            if r.status is RunStatus.COMPLETED and r.finished is not None
        }
        return [a.created.timestamp() for a in artifacts], runs

    async def unfinished(self, run_ids: set[str]) -> set[str]:
        """Which of ``run_ids`` are not recorded as finished yet."""
        services = await Services.open(self.home)
        try:
            records = await services.runs.list_runs(limit=100_000)
        finally:
            await services.close()
        done = {r.id for r in records if r.status in FINISHED_RUN_STATUSES}
        return run_ids - done

    def integrity(self) -> list[str]:
        """The rows of ``PRAGMA integrity_check`` of the metadata store."""
        with contextlib.closing(sqlite3.connect(self.home / "conveyor.db")) as db:
            return [str(row[0]) for row in db.execute("PRAGMA integrity_check")]

    async def dead_letters(self) -> list[DeadLetter]:
        """Take every message out of the stack's dead-letter queue."""
        connection = await aio_pika.connect(self.vhost_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(TOPOLOGY.dead_letter_queue, passive=True)
            letters = []
            while (message := await queue.get(fail=False)) is not None:
                letters.append(_dead_letter(message.body, message.headers))
                await message.ack()
        return letters


async def _freeze(process: Process, hold_s: float) -> float:
    """SIGSTOP ``process`` for ``hold_s`` seconds; when it was continued."""
    process.send(signal.SIGSTOP)
    try:
        await asyncio.sleep(hold_s)
    finally:
        process.send(signal.SIGCONT)
    return time.time()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


async def _outcome(services: Services, record: RunRecord) -> RunOutcome:
    artifacts = await services.artifacts.list_artifacts(run_id=record.id, limit=100_000)
    per_step = Counter(a.step_name for a in artifacts)
    store = run_artifact_store(record.stack_snapshot)
    steps = []
    for step in await services.runs.steps_of(record.id):
        steps.append(
            StepOutcome(
                name=step.name,
                status=step.status.value,
                attempt=step.attempt,
                upstream=tuple(step.upstream),
                mark=await asyncio.to_thread(_mark, store, step.outputs),
                artifacts=per_step[step.name],
                outputs=max(1, len(step.outputs)),
            )
        )
    return RunOutcome(record.id, record.status.value, record.error, tuple(steps))


def _mark(store: ArtifactStore, outputs: dict[str, ArtifactRef]) -> dict[str, Any] | None:
    if len(outputs) != 1:
        return None
    [ref] = outputs.values()
    try:
        value = load_artifact(store, ref, allow_pickle=False)
    except Exception as exc:  # reported by the checker as an unreadable output
        log.warning("output not readable", error=f"{type(exc).__name__}: {exc}")
        return None
    return value if isinstance(value, dict) else None


def _dead_letter(body: bytes, headers: dict[str, Any] | None) -> DeadLetter:
    reason = str((headers or {}).get(REASON_HEADER, "")) or str((headers or {}).get("x-death"))
    try:
        event = parse_event(body)
    except Exception:
        return DeadLetter("unparsable", None, None, reason)
    step = event.step.name if isinstance(event, StepReady) else None
    return DeadLetter(event.type, event.run_id, step, reason)


# --- the submitter ---


async def submit_runs(
    vhost_url: str,
    count: int,
    every_s: float,
    parameters: dict[str, Any],
    submitted: list[tuple[str, float]],
) -> None:
    """Publish ``count`` RunRequested, one every ``every_s``, straight to the broker.

    A run counts as submitted once the broker confirmed its request; it is appended to
    ``submitted`` with the time, so that a caller sees them as they go. The cache is off:
    the checker counts each run's own executions (identical runs would reuse each other's).
    """
    connection = await aio_pika.connect_robust(vhost_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for _ in range(count):
            request = RunRequested(
                run_id=new_id(), pipeline=PIPELINE, parameters=parameters, cache=False
            )
            message = aio_pika.Message(
                encode_event(request),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=request.event_id,
                type=request.type,
            )
            await channel.default_exchange.publish(
                message, routing_key=TOPOLOGY.runs_queue, mandatory=True
            )
            submitted.append((request.run_id, time.time()))
            await asyncio.sleep(every_s)


async def publish_raw(vhost_url: str, queue: str, body: bytes) -> None:
    """Publish ``body`` as it is to ``queue`` (to see what a poison message becomes)."""
    connection = await aio_pika.connect(vhost_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
