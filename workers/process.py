"""Long-running processes: signals, the consumer watchdog, and the worker process itself.

A first SIGTERM or SIGINT asks for a graceful stop; a second one stops at once (the broker
requeues whatever this process held unacked). A process connected to its broker whose
consumers are all gone for too long (pitfall: a worker alive but deaf after a reconnect)
exits non-zero, so that its supervisor restarts it; so does a worker whose threads are stuck
in sync steps that timed out. A broker that is down is waited for, at start and later, for
as long as the process runs (or ``reconnect_timeout_s``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from conveyor.contracts import DEFAULT_POOL, ComponentType, ConveyorError, Isolation, StackSpec
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.flavors import get_flavor, make_artifact_store
from conveyor.workers.heap import settle_after_start
from conveyor.workers.loggers import get_logger
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.runtime import WorkerPool
from conveyor.workers.step_resolver import StepResolver

log = get_logger("conveyor.process")

EXIT_OK = 0
EXIT_HARD_STOP = 130
EXIT_DEAF = 3
"""Exit status of a process that had no consumer for longer than its watchdog allows."""
EXIT_STUCK = 4
"""Exit status of a worker with as many stuck step threads as its concurrency."""
EXIT_BROKER_DOWN = 5
"""Exit status of a process whose broker stayed unreachable longer than reconnect_timeout_s."""


class Signals:
    """SIGTERM/SIGINT handling: the first sets :attr:`stop`, the second exits at once."""

    def __init__(self, on_hard_stop: Callable[[], None] | None = None) -> None:
        self.stop = asyncio.Event()
        self._on_hard_stop = on_hard_stop
        self._installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._received, sig)
            self._installed.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def _received(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            log.info("stopping gracefully; send the signal again to stop at once", signal=sig.name)
            self.stop.set()
            return
        log.warning("second signal: stopping at once", signal=sig.name)
        if self._on_hard_stop is not None:
            self._on_hard_stop()
        os._exit(EXIT_HARD_STOP)


async def watch_consumers(
    count: Callable[[], int],
    limit_s: float,
    *,
    unreachable_for: Callable[[], float | None] = lambda: None,
    down_limit_s: float | None = None,
    every_s: float = 1.0,
) -> int:
    """The exit status, once the process should end: :data:`EXIT_DEAF` when connected with
    ``count()`` zero for ``limit_s`` seconds in a row; :data:`EXIT_BROKER_DOWN` when the
    broker has been unreachable for ``down_limit_s`` (None: never).

    While the broker is unreachable, no consumer is what is expected: the connection is
    being re-established, and the consumers come back with it.
    """
    loop = asyncio.get_running_loop()
    zero_since: float | None = None
    warned = False
    while True:
        await asyncio.sleep(every_s)
        down_for = unreachable_for()
        if down_for is not None:
            zero_since = None
            if down_limit_s is not None and down_for >= down_limit_s:
                log.error(
                    "broker unreachable for too long; exiting (reconnect_timeout_s)",
                    down_for_s=round(down_for, 1),
                )
                return EXIT_BROKER_DOWN
            continue
        if count() > 0:
            if warned:
                log.info("consumers are back")
            zero_since, warned = None, False
            continue
        now = loop.time()
        if zero_since is None:
            zero_since = now
            if not warned:
                log.warning("no consumer: the broker delivers nothing to this process")
                warned = True
        elif now - zero_since >= limit_s:
            log.error("no consumer for too long; exiting so a supervisor restarts this process")
            return EXIT_DEAF


async def watch_health(healthy: Callable[[], bool], every_s: float = 1.0) -> int:
    """:data:`EXIT_STUCK`, once ``healthy()`` is false (a worker whose step threads are stuck)."""
    # Polled: threads end on their own, with no event to wait for.
    while True:
        await asyncio.sleep(every_s)
        if not healthy():
            break
    log.error(
        "as many step threads are stuck as this worker runs steps at once (sync steps that "
        "timed out or were cancelled, still running); exiting so a supervisor replaces this "
        "process. Consider @step(isolation='process') for the steps that hang"
    )
    return EXIT_STUCK


async def wait_for_stop(signals: Signals, *watchdogs: asyncio.Task[int]) -> int | None:
    """Wait for a stop signal or a watchdog; the exit status of the watchdog that fired."""
    stop = asyncio.create_task(signals.stop.wait(), name="wait-for-signal")
    try:
        await asyncio.wait([stop, *watchdogs], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        await asyncio.gather(stop, return_exceptions=True)
    for watchdog in watchdogs:
        if watchdog.done() and not watchdog.cancelled():
            return watchdog.result()
    return None


def watchdog_of(
    broker: RabbitMQBroker, config: RabbitMQOrchestratorConfig, count: Callable[[], int]
) -> asyncio.Task[int]:
    """The watchdog task of a process consuming through ``broker`` (see ``watch_consumers``)."""
    return asyncio.create_task(
        watch_consumers(
            count,
            config.watchdog_s,
            unreachable_for=lambda: broker.unreachable_for,
            down_limit_s=config.reconnect_timeout_s,
        ),
        name="watchdog",
    )


def rabbitmq_config(stack: StackSpec) -> RabbitMQOrchestratorConfig:
    """The stack's orchestrator config, or an error saying it needs a rabbitmq orchestrator."""
    component = stack.component(ComponentType.ORCHESTRATOR)
    config = get_flavor(component.type, component.flavor).validate(component.config)
    if not isinstance(config, RabbitMQOrchestratorConfig):
        raise ConveyorError(
            f"stack {stack.name!r} has a {component.flavor!r} orchestrator, which runs its "
            "workers inside the client; worker and controller processes need a rabbitmq one"
        )
    return config


async def serve_workers(
    stack: StackSpec,
    *,
    pools: Sequence[str] = (),
    concurrency: int | None = None,
    grace_s: float | None = None,
    name: str | None = None,
    code_cache: Path,
    trusted: Sequence[str] = (),
    isolation: Isolation | None = None,
) -> int:
    """Run a worker process on ``stack`` until a signal (or a watchdog); its exit status.

    Steps come from each run's code archive, kept under ``code_cache``, or from the installed
    packages in ``trusted`` and the orchestrator's ``trusted_packages``; nothing else runs.
    Exits EXIT_DEAF without consumers for too long, EXIT_STUCK once its threads are stuck,
    EXIT_BROKER_DOWN after ``reconnect_timeout_s`` without its broker.
    """
    config = rabbitmq_config(stack)
    store = make_artifact_store(stack)
    # A worker that cannot use its store says so at once, not once per step.
    await asyncio.to_thread(store.check)
    signals = Signals()
    signals.install()
    broker = RabbitMQBroker.of_stack(stack.name, config)
    resolver = StepResolver(
        store, cache_dir=code_cache, trusted=[*config.trusted_packages, *trusted]
    )
    pool = WorkerPool(
        broker,
        store,
        resolver=resolver,
        pools=list(pools) or [DEFAULT_POOL],
        concurrency=concurrency or config.concurrency,
        name=name,
        step_timeout=config.step_timeout_s,
        announce_after=config.announce_after_s,
        max_deliveries=config.max_deliveries,
        heartbeat_s=config.heartbeat_s,
        isolation=isolation or config.isolation,
    )
    watchdogs: list[asyncio.Task[int]] = []
    try:
        if not await broker.start_patiently(signals.stop):
            return EXIT_OK  # stopped while waiting for the broker
        await pool.start()
        settle_after_start()
        watchdogs = [
            watchdog_of(broker, config, lambda: pool.consumer_count),
            asyncio.create_task(watch_health(lambda: pool.healthy), name="health"),
        ]
        code = await wait_for_stop(signals, *watchdogs)
        log.info("worker stopping", worker=pool.facts.worker)
        await broker.pause()
        await pool.stop(grace=config.grace_s if grace_s is None else grace_s)
        return EXIT_OK if code is None else code
    finally:
        for watchdog in watchdogs:
            watchdog.cancel()
        await asyncio.gather(*watchdogs, return_exceptions=True)
        await pool.stop(grace=0)
        await broker.stop()
        signals.uninstall()
        log.info("worker stopped", worker=pool.facts.worker)
