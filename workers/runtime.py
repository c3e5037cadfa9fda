"""The worker runtime: consume StepReady, execute, publish the completion, then ack.

Ack timing is one policy: a StepReady is acked only after its StepSucceeded or StepFailed
was confirmed by the broker, and those of the riders run in place on it (how the outcomes
go out, together or alone: ``workers/outcomes.py``). A worker that dies before that leaves
the message unacked, and the broker delivers it again.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog

from conveyor.contracts import (
    DEFAULT_POOL,
    ArtifactStore,
    AttemptsCancelled,
    Broker,
    ConveyorError,
    Delivery,
    Event,
    Isolation,
    StepHeartbeat,
    StepReady,
    StepStarted,
    Subscription,
    Unreadable,
    UnreadableDelivery,
    UntrustedStep,
    WorkerFacts,
    utcnow,
)
from conveyor.contracts.events import unbundled
from conveyor.workers import step_logs
from conveyor.workers.execution import StepExecutor
from conveyor.workers.limits import HAND_BACK_S, IN_PLACE_S
from conveyor.workers.loggers import get_logger
from conveyor.workers.message_parts import parts
from conveyor.workers.outcomes import Answer, Carrier, Outcome, SiblingReports
from conveyor.workers.release import attempts_refused, cancelled_run, cannot_read
from conveyor.workers.step_resolver import StepResolver

log = get_logger("conveyor.worker")

Attempt = tuple[str, str, int]
"""(run id, step, attempt)"""
REMEMBERED_OUTCOMES = 10_000
"""Outcomes a worker remembers, to answer a StepReady delivered again (its ack lost with a
channel) without running it twice."""
REMEMBERED_CANCELLATIONS = 10_000
MAX_DELIVERIES = 3
HEARTBEAT_S = 10.0


async def _announced(announcing: list[asyncio.Task[None]]) -> None:
    """Wait for the StepStarted publishes. One the broker did not take in time (it is down)
    is not worth the outcome in hand: the completion, published next, says it all."""
    for result in await asyncio.gather(*announcing, return_exceptions=True):
        if isinstance(result, ConveyorError) and result.retryable:
            log.warning("StepStarted not confirmed; publishing the outcome", error=str(result))
        elif isinstance(result, BaseException):
            raise result


def worker_facts(name: str | None = None) -> WorkerFacts:
    """Who this worker process is, as recorded on each step it runs."""
    pid = os.getpid()
    return WorkerFacts(worker=name or f"{socket.gethostname()}:{pid}", pid=pid)


class WorkerPool:
    """Runs up to ``concurrency`` steps at once from the queues of ``pools``.

    ``isolation`` is where sync bodies run unless their step says: ``"thread"`` or
    ``"process"`` (see ``execution``).

    Lifecycle: ``start()``, ``stop()`` (idempotent, safe before start), or ``async with``.
    """

    def __init__(
        self,
        broker: Broker,
        store: ArtifactStore,
        *,
        resolver: StepResolver | None = None,
        pools: Sequence[str] = (DEFAULT_POOL,),
        concurrency: int = 4,
        name: str | None = None,
        step_timeout: float | None = None,
        announce_after: float = 0.0,
        max_deliveries: int = MAX_DELIVERIES,
        heartbeat_s: float = HEARTBEAT_S,
        isolation: Isolation = "thread",
        remembered_outcomes: int = REMEMBERED_OUTCOMES,
    ) -> None:
        self._broker = broker
        self._pools = list(pools)
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self.facts = worker_facts(name)
        self.resolver = resolver or StepResolver(store)
        self._executor = StepExecutor(
            store, self.resolver, self.facts, concurrency=concurrency, isolation=isolation
        )
        self._subscriptions: list[Subscription] = []
        self._control: Subscription | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # The running executions by run, then by (step, attempt).
        self._executions: dict[str, dict[tuple[str, int], asyncio.Task[Any]]] = {}
        # Attempts whose StepStarted went out: their leases are renewed by heartbeats.
        self._announced: set[Attempt] = set()
        self._heartbeats: asyncio.Task[None] | None = None
        self._heartbeat_s = heartbeat_s
        self._stopping = False
        self._capturing = False  # step_logs installed by this pool, until it stops
        self._step_timeout = step_timeout
        self._announce_after = announce_after
        self._max_deliveries = max_deliveries
        # Outcomes of the attempts this worker ran, by (run, step, attempt): a StepReady
        # delivered again (its ack was lost with a channel) is answered, not run twice.
        self._outcomes: OrderedDict[Attempt, asyncio.Future[Answer]] = OrderedDict()
        self._remembered = remembered_outcomes
        # Runs (step "", attempt 0) and attempts the controller said to stop: a StepReady of
        # one that is still queued is dropped instead of run.
        self._cancelled: OrderedDict[Attempt, None] = OrderedDict()

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def consumer_count(self) -> int:
        """Consumers the broker still delivers to (zero means this worker is deaf)."""
        return sum(1 for s in self._subscriptions if s.active)

    @property
    def stuck_threads(self) -> int:
        """Threads of sync steps that timed out or were cancelled and still run."""
        return self._executor.stuck_threads

    @property
    def healthy(self) -> bool:
        """False once ``concurrency`` threads are stuck: a worker process then exits."""
        return self._executor.healthy

    async def start(self) -> None:
        """Start consuming the step queue of every pool."""
        if not self._capturing:
            step_logs.install()
            self._capturing = True
        # Listening first: a cancellation must not slip between the first step and it.
        self._control = await self._broker.listen(
            self._on_control, unreadable=self._on_unreadable_control
        )
        for pool in self._pools:
            await self._consume(pool)
        self._heartbeats = asyncio.create_task(self._beat(), name="heartbeats")
        log.info("worker started", worker=self.facts.worker, pools=self._pools)

    async def _consume(self, pool: str) -> None:
        queue = self._broker.topology.step_queue(pool)
        self._subscriptions.append(
            await self._broker.consume(
                queue,
                self._on_step_ready,
                prefetch=self._concurrency,
                unreadable=self._on_unreadable,
            )
        )

    async def serve(self, pools: Iterable[str]) -> None:
        """Consume the step queues of ``pools`` too, those it does not yet: the embedded
        stack's one worker runs the steps of every pool a run names."""
        if self._control is None or self._stopping:
            raise RuntimeError("WorkerPool is not running")
        for pool in sorted(set(pools) - set(self._pools)):
            self._pools.append(pool)  # before the await: a concurrent call must not add it too
            await self._consume(pool)
            log.info("worker consumes another pool", worker=self.facts.worker, pool=pool)

    async def _on_control(self, event: Event) -> None:
        if isinstance(event, AttemptsCancelled):
            self._stop(event.run_id, event.attempts, event.reason)

    def _on_unreadable_control(self, message: Unreadable) -> None:
        """A control event this worker cannot read (most likely a newer controller's): one
        that cancels a whole run stops that run's attempts here all the same, since running
        them on helps nobody; one that may name only some attempts of a run that goes on
        cannot be told apart from its run, and is left (their outcomes are fenced anyway)."""
        who = message.identity
        if who.type != "AttemptsCancelled":
            return
        error = cannot_read(
            "worker", "cancellation", "controller", message.reason, message.sender_version
        )
        run_id = cancelled_run(message)
        if run_id is None:
            log.warning(
                "cancellation unreadable; its attempts go on", run_id=who.run_id, error=error
            )
            return
        log.warning(
            "cancellation unreadable; stopping the run's attempts", run_id=run_id, error=error
        )
        self._stop(run_id, {}, error)

    def _stop(self, run_id: str, attempts: Mapping[str, int], reason: str) -> None:
        """Stop ``attempts`` of ``run_id`` here (every attempt of the run if empty), and drop
        those still waiting in the queue when they come."""
        running = self._executions.get(run_id, {})
        if attempts:
            targets = list(attempts.items())
            self._cancelled.update(dict.fromkeys((run_id, s, a) for s, a in targets))
        else:
            targets = list(running)
            self._cancelled[(run_id, "", 0)] = None  # the whole run
        while len(self._cancelled) > REMEMBERED_CANCELLATIONS:
            self._cancelled.popitem(last=False)
        stopping = [running[t] for t in targets if t in running]
        for execution in stopping:
            execution.cancel()
        if stopping:
            log.info("attempts stopped", run_id=run_id, stopped=len(stopping), reason=reason)

    def _is_cancelled(self, ready: StepReady) -> bool:
        run = ready.run_id
        attempt = (run, ready.step.name, ready.attempt)
        return (run, "", 0) in self._cancelled or attempt in self._cancelled

    async def _beat(self) -> None:
        """Renew the leases of the announced attempts, every ``heartbeat_s``."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            beats = [
                StepHeartbeat(run_id=run_id, step=step, attempt=attempt, by=self.facts)
                for run_id, step, attempt in self._announced
            ]
            if not beats:
                continue
            try:
                await self._broker.publish(beats)
            except Exception as exc:
                log.warning("heartbeats not sent", error=f"{type(exc).__name__}: {exc}")

    async def _on_step_ready(self, delivery: Delivery) -> None:
        if self._stopping:
            await delivery.requeue()
            return
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            event = delivery.event
            if isinstance(event, StepReady) and event.siblings:
                await self._run_siblings(delivery, event)
            else:
                await self._run(delivery)
        finally:
            self._in_flight.discard(task)

    async def _run_siblings(self, delivery: Delivery, ready: StepReady) -> None:
        """Run each step of a message with siblings as if it came alone. Delivered again
        (the worker that held it died, or lost the broker), it is split first, each step a
        message of its own, so that one that kills its worker is soon alone: it is given up
        after one death more than a step that came alone."""
        steps = unbundled(ready)
        if delivery.deliveries > 1:
            log.info("siblings delivered again; split", run_id=ready.run_id, steps=len(steps))
            await self._broker.publish(steps)
            await delivery.ack()
            return
        reports = SiblingReports(self._broker, len(steps))
        runs = [self._run_sibling(part, reports) for part in parts(delivery, self._broker, steps)]
        for result in await asyncio.gather(*runs, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _on_unreadable(self, delivery: UnreadableDelivery) -> None:
        """A StepReady this worker cannot read (most likely a newer controller's): its
        attempt fails, not to be retried (every worker of this release would refuse it too),
        and so do those of the siblings it carries that can be read (its riders are skipped
        with it), so that its run does not wait for ever; the message goes to the dead
        letters."""
        message = delivery.unreadable
        who = message.identity
        if who.type == "StepReady":
            error = cannot_read(
                "worker", "step", "controller", message.reason, message.sender_version
            )
            # Its siblings too: each is named only inside it.
            refused = attempts_refused(who, error, self.facts)
            log.warning(
                "step unreadable", run_id=who.run_id, step=who.step, steps=len(refused), error=error
            )
            if refused:
                await self._broker.publish(refused)
        await delivery.reject()

    async def _run_sibling(self, part: Delivery, reports: SiblingReports) -> None:
        try:
            await self._run(part, reports)
        finally:
            reports.ended()

    async def _run(self, delivery: Delivery, reports: SiblingReports | None = None) -> None:
        event = delivery.event
        if not isinstance(event, StepReady):
            await delivery.reject(f"expected StepReady on a step queue, got {event.type}")
            return
        ready: StepReady | None = event
        began = asyncio.get_running_loop().time()
        carrier = Carrier(delivery, self._broker, reports)
        try:
            while ready is not None:
                # Bound with tokens that restore what was there: ``bound_contextvars`` reads
                # the whole context first, which cost 1-2% of an embedded step.
                tokens = structlog.contextvars.bind_contextvars(
                    run_id=ready.run_id, step=ready.step.name, attempt=ready.attempt
                )
                try:
                    ready = await self._run_ready(ready, carrier, began)
                finally:
                    structlog.contextvars.reset_contextvars(**tokens)
        except BaseException:
            carrier.abandon()
            raise

    def _in_place(self, rider: StepReady, delivery: Carrier, began: float) -> bool:
        """Whether ``rider``, the next rider of ``delivery``, runs here, its parent's
        outcome confirmed, rather than forwarded through the broker: while the delivery's
        steps took little. A worker that dies runs them all again from the first (their
        recorded outcomes are ignored), so this bounds the work done twice; a delivery
        again, or a worker that stops, forwards its riders. A rider of a pool this worker
        does not serve goes to its pool's queue, as any step of that pool. Once a publish
        of the delivery failed, nothing more runs on it: it is given back."""
        if rider.step.pool not in self._pools or delivery.failing:
            return False
        elapsed = asyncio.get_running_loop().time() - began
        return delivery.deliveries == 1 and not self._stopping and elapsed < IN_PLACE_S

    async def _run_ready(
        self, ready: StepReady, delivery: Carrier, began: float
    ) -> StepReady | None:
        """Run ``ready`` (or answer it, if run before) and publish its outcome; return its
        rider to run next in place, or None once ``delivery`` is settled."""
        key = (ready.run_id, ready.step.name, ready.attempt)
        known = self._outcomes.get(key)
        if known is not None:
            log.info("attempt delivered again; answering with its outcome")
            await asyncio.wait([known])
            if known.cancelled():
                await delivery.requeue()
                return None
            await delivery.sent()
            await known.result().send(self._broker)
            await delivery.ack()
            return None
        if self._is_cancelled(ready):
            log.info("attempt dropped: the controller stopped it")
            await delivery.ack()
            return None
        if delivery.deliveries > self._max_deliveries:
            await self._give_up(ready, delivery)
            return None
        known = self._outcomes[key] = asyncio.get_running_loop().create_future()
        while len(self._outcomes) > self._remembered:
            self._outcomes.popitem(last=False)
        try:
            outcome = await self._attempt_in_slot(ready, delivery)
        except UntrustedStep as exc:
            self._forget(key, known)
            if ready is not delivery.event:
                # A rider in place: its own StepReady goes on, for a worker that may trust
                # it; one that does not dead-letters it as below, not the delivery it rode.
                log.info("rider refused here; forwarded", reason=str(exc))
                await delivery.sent()
                await self._broker.publish([ready])
                await delivery.ack()
                return None
            # Nothing of it was imported or run. The run hears that the step failed (a
            # real run must not wait for ever), and the message goes to the dead letters.
            log.warning("step refused", reason=str(exc))
            await self._broker.publish([self._executor.refused(ready, exc)])
            await delivery.reject(str(exc))
            return None
        except BaseException:
            self._forget(key, known)
            raise
        if outcome is None:
            self._forget(key, known)
            return None
        answer = Answer(outcome, ready)
        known.set_result(answer)
        if answer.next is not None and self._in_place(answer.next, delivery, began):
            # Marked forwarded only once the delivery is acked: a delivery of this attempt
            # again before that (a publish failed, the worker stopped) hands the rider on.
            delivery.hold(answer.outcome)
            delivery.ride(answer)
            return answer.next
        held = delivery.take_held()
        await delivery.sent()
        if answer.next is None and delivery.reports is not None:
            # Its siblings' outcomes go with it: one message for the message's steps.
            await delivery.reports.report([*held, answer.outcome])
        else:
            await answer.send(self._broker, held)
        await delivery.ack()
        return None

    async def _attempt_in_slot(self, ready: StepReady, delivery: Carrier) -> Outcome | None:
        """``_attempt`` once one of the ``concurrency`` slots is free: each pool's queue
        hands over that many, and a worker of several pools runs no more at once in all."""
        if ready is delivery.event and delivery.reports is not None:
            # A sibling waits a little only: the steps of its message wait for this worker's
            # slots, while another worker's may be free.
            try:
                async with asyncio.timeout(HAND_BACK_S):
                    await self._slots.acquire()
            except TimeoutError:
                log.info("no slot came free; sibling handed back")
                await delivery.requeue()
                return None
        else:
            await self._slots.acquire()
        try:
            if self._is_cancelled(ready):  # stopped while it waited for its slot
                log.info("attempt dropped: the controller stopped it")
                await delivery.ack()
                return None
            return await self._attempt(ready, delivery)
        finally:
            self._slots.release()

    async def _give_up(self, ready: StepReady, delivery: Delivery) -> None:
        """Fail an attempt whose deliveries kept ending with their worker: it is not run."""
        lost = delivery.deliveries - 1
        error = (
            f"the worker running it died {lost} times (or lost the broker while it ran); "
            f"not run again after {self._max_deliveries} deliveries"
        )
        log.error("attempt given up", reason=error)
        failed = self._executor.failed(ready, error)
        await self._broker.publish([failed])
        await delivery.ack()

    def _forget(self, key: Attempt, known: asyncio.Future[Answer]) -> None:
        """Drop an attempt that has no outcome: a redelivery waiting on it is requeued."""
        self._outcomes.pop(key, None)
        known.cancel()

    async def _attempt(self, ready: StepReady, delivery: Carrier) -> Outcome | None:
        """Run one attempt; None when the controller stopped it (the delivery is acked)."""
        limits = [t for t in (ready.step.timeout_s, self._step_timeout) if t is not None]
        started_at = utcnow()
        # The step starts while its StepStarted is confirmed (waiting first would add a
        # broker round trip to every step); with ``announce_after``, a step that finishes
        # sooner is not announced at all, its completion says it all. A StepStarted that was
        # sent is confirmed, so ahead of the completion on the wire, before returning.
        announcing: list[asyncio.Task[None]] = []

        key = (ready.run_id, ready.step.name, ready.attempt)

        def announce() -> None:
            self._announced.add(key)
            started = StepStarted(
                run_id=ready.run_id,
                step=ready.step.name,
                attempt=ready.attempt,
                by=self.facts,
                time=started_at,
            )
            announcing.append(asyncio.create_task(delivery.announce(started)))

        timer = asyncio.get_running_loop().call_later(self._announce_after, announce)
        execution = asyncio.create_task(
            self._executor.execute(ready, timeout=min(limits, default=None))
        )
        running = self._executions.setdefault(ready.run_id, {})
        running[key[1:]] = execution
        try:
            outcome = await execution
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                for task in announcing:
                    task.cancel()
                await asyncio.gather(*announcing, return_exceptions=True)
                raise
            # The controller stopped this attempt (the run was cancelled, or the attempt's
            # lease lapsed and another took over): nothing to report.
            if announcing:
                await _announced(announcing)
            await delivery.ack()
            return None
        finally:
            timer.cancel()
            self._announced.discard(key)
            running.pop(key[1:], None)
            if not running:
                self._executions.pop(ready.run_id, None)
        if announcing:
            await _announced(announcing)
        return outcome

    async def stop(self, grace: float = 10.0) -> None:
        """Stop consuming, let running steps finish within ``grace`` s, requeue the rest."""
        self._stopping = True
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self._control is not None:
            await self._control.cancel()
        subscriptions, self._subscriptions = self._subscriptions, []
        running = list(self._in_flight)
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for subscription in subscriptions:
            await subscription.cancel()
        self._executor.close()
        if self._capturing:
            self._capturing = False
            step_logs.uninstall()
