"""Long-running processes: signals, the consumer watchdog, and the worker process itself.

A first SIGTERM or SIGINT asks for a graceful stop; a second one stops at once (the broker
requeues whatever this process held unacked). A process connected to its broker whose
consumers are all gone for too long (pitfall: a worker alive but deaf after a reconnect)
exits non-zero, so that its supervisor restarts it. A broker that is down is waited for,
at start and later, for as long as the process runs (or ``reconnect_timeout_s``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from conveyor.contracts import DEFAULT_POOL, ComponentType, ConveyorError, StackSpec
from conveyor.workers.broker_rabbitmq import RabbitMQBroker
from conveyor.workers.flavors import get_flavor, make_artifact_store, make_broker
from conveyor.workers.rabbitmq_config import RabbitMQOrchestratorConfig
from conveyor.workers.runtime import WorkerPool
from conveyor.workers.step_resolver import StepResolver

log = structlog.get_logger("conveyor.process")

EXIT_OK = 0
EXIT_HARD_STOP = 130
EXIT_DEAF = 3
"""Exit status of a process that had no consumer for longer than its watchdog allows."""
EXIT_BROKER_DOWN = 4
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


async def wait_for_stop(signals: Signals, watchdog: asyncio.Task[int]) -> int | None:
    """Wait for a stop signal or the watchdog; the watchdog's exit status if it fired."""
    stop = asyncio.create_task(signals.stop.wait(), name="wait-for-signal")
    try:
        await asyncio.wait([stop, watchdog], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        await asyncio.gather(stop, return_exceptions=True)
    if watchdog.done() and not watchdog.cancelled():
        return watchdog.result()
    return None


def rabbitmq_broker(stack: StackSpec) -> RabbitMQBroker:
    """The broker of a stack whose orchestrator is a rabbitmq one (see ``rabbitmq_config``)."""
    broker = make_broker(stack)
    assert isinstance(broker, RabbitMQBroker)
    return broker


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
) -> int:
    """Run a worker process on ``stack`` until a signal (or the watchdog); its exit status.

    Steps come from each run's code archive, kept under ``code_cache``, or from the installed
    packages in ``trusted`` and the orchestrator's ``trusted_packages``; nothing else runs.
    """
    config = rabbitmq_config(stack)
    store = make_artifact_store(stack)
    # A worker that cannot use its store says so at once, not once per step.
    await asyncio.to_thread(store.check)
    signals = Signals()
    signals.install()
    broker = rabbitmq_broker(stack)
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
    )
    watchdog: asyncio.Task[int] | None = None
    try:
        if not await broker.start_patiently(signals.stop):
            return EXIT_OK  # stopped while waiting for the broker
        await pool.start()
        watchdog = watchdog_of(broker, config, lambda: pool.consumer_count)
        code = await wait_for_stop(signals, watchdog)
        log.info("worker stopping", worker=pool.facts.worker)
        await broker.pause()
        await pool.stop(grace=config.grace_s if grace_s is None else grace_s)
        return EXIT_OK if code is None else code
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        await pool.stop(grace=0)
        await broker.stop()
        signals.uninstall()
        log.info("worker stopped", worker=pool.facts.worker)
