"""The controller: the only writer of run state.

It takes events from the broker in batches, applies each to the run's state machine,
records the new state together with the events to publish in one transaction (the outbox),
publishes them, and only then acks what it consumed. After a crash, it republishes the
outbox rows that were never confirmed and reloads every unfinished run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from conveyor.contracts import (
    ArtifactStore,
    Broker,
    ConveyorError,
    Delivery,
    Event,
    PipelineSpec,
    RunCancelRequested,
    RunFinished,
    RunRequested,
    RunStatus,
    StackSpec,
    StepFailed,
    StepHeartbeat,
    StepStarted,
    StepSucceeded,
    Subscription,
    UnreadableDelivery,
    is_status_event,
    utcnow,
)
from conveyor.contracts.events import StepsDone
from conveyor.service import scheduling
from conveyor.service.batch_failures import BatchFailures, being_cancelled
from conveyor.service.batches import Batch
from conveyor.service.cache_keys import without_cache
from conveyor.service.early_events import EarlyEvents
from conveyor.service.event_publisher import EventPublisher
from conveyor.service.pipelines import load_pipeline
from conveyor.service.progress import ProgressBuffer
from conveyor.service.run_queue import RunQueue
from conveyor.service.run_state import RunState, Transition
from conveyor.service.run_timers import LEASE_S, MAX_LOST, RunTimers
from conveyor.service.step_decisions import StepDecisions
from conveyor.service.step_reuse import StepReuse
from conveyor.service.store import (
    Database,
    Outbox,
    OwnedRuns,
    RunRequests,
    RunStore,
    Writes,
)
from conveyor.service.unreadable import Inbound, UnreadableMessage, stand_in
from conveyor.workers.code_archive import attach_code
from conveyor.workers.loggers import get_logger
from conveyor.workers.message_parts import parts
from conveyor.workers.steps import readable

log = get_logger("conveyor.controller")

MAX_BATCH = 512
STOPPED = "its stack stopped before the run finished"
"""Why a run still going when its embedded stack stops ends cancelled."""
NEVER_STARTED = "its stack stopped before the run started"
"""Why a run still queued when its embedded stack stops ends cancelled."""
INBOX_PREFETCH = 4096
IDLE_FLUSH_S = 0.05
"""Confirmed outbox rows are noted sent with the next batch, or after this long idle."""

Owner = tuple[str, int, str]
WorkerEvent = StepStarted | StepHeartbeat | StepSucceeded | StepFailed


def compile_request(request: RunRequested, code_store: ArtifactStore | None) -> PipelineSpec:
    """The DAG of a RunRequested that names a pipeline, compiled here; with a
    ``code_store``, its source is packed into code archives there for remote workers."""
    spec, definitions = load_pipeline(request.pipeline).compile(**request.parameters)
    if code_store is None:
        return spec
    return attach_code(spec, definitions, code_store)


def _durable(event: Event) -> bool:
    """Whether ``event`` is kept in the outbox until the broker confirmed it. Status
    updates for followers are not: losing one costs a follower a refresh, while
    RunFinished (which a follower waits for) is kept."""
    return not is_status_event(event) or isinstance(event, RunFinished)


class Controller:
    """Drives the runs of one stack.

    ``owner`` is set when the controller is embedded in a client process: its runs are
    recorded as owned by that process (and failed if it dies), and nothing is resumed. A
    service controller (``owner=None``) resumes the stack's unfinished runs on start.
    ``max_active_runs`` (an embedded stack's): more runs requested wait, queued, their
    requests unsettled, until runs end (``RunQueue``).
    """

    def __init__(
        self,
        db: Database,
        broker: Broker,
        stack: StackSpec,
        *,
        owner: Owner | None = None,
        code_store: ArtifactStore | None = None,
        artifacts: ArtifactStore | None = None,
        lease_s: float = LEASE_S,
        max_lost: int = MAX_LOST,
        max_active_runs: int | None = None,
    ) -> None:
        self._db = db
        self._code_store = code_store
        self._runs = RunStore(db)
        self._outbox = Outbox(db)
        self._run_requests = RunRequests(db)
        self._broker = broker
        self._stack = stack
        # Recorded with each of its runs: dumped once, not per run.
        self._stack_snapshot = stack.model_dump(mode="json")
        self._owner = owner
        self._states: dict[str, RunState] = {}
        # Reused outputs are checked in the stack's store; without one, every step runs.
        self._early = EarlyEvents()
        self._decisions = StepDecisions(StepReuse(self._runs, artifacts, stack.id), self._states)
        # Runs whose steps waiting for a decision must be decided again (after a restart,
        # or a failed batch whose decisions were not recorded).
        self._undecided: set[str] = set()
        self._timers = RunTimers(
            self._states,
            commit=self._commit,
            state_of=self._state_of,
            lease_s=lease_s,
            max_lost=max_lost,
        )
        self._inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self._queue = RunQueue(max_active_runs)
        # The runs it recorded queued and has not started: ended, never started, at its stop.
        self._shown_queued: set[str] = set()
        self._subscriptions: list[Subscription] = []
        self._loop_task: asyncio.Task[None] | None = None
        # Confirmed outbox rows are marked sent in the next batch's transaction (or when
        # idle), which saves a transaction per batch; a crash in between only republishes.
        self._publisher = EventPublisher(broker, self._kept)
        self._progress = ProgressBuffer()
        self._failures = BatchFailures(
            db,
            stack.name,
            process=self._process,
            forget=self._forget_states,
            unpublished=lambda: bool(self._publisher.committed),
        )

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _kept(self, event: Event) -> bool:
        """Whether ``event`` goes to the outbox. Only a service controller replays its
        outbox (at its next start); an embedded one never does (its runs end with its
        process, and its broker's messages with them), so it keeps none."""
        return self._owner is None and _durable(event)

    @property
    def alive(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def problem(self) -> str | None:
        """Why the controller cannot get on (and when it tries again); None while it can."""
        return self._failures.problem

    async def start(self) -> None:
        """Replay the outbox and reload unfinished runs (service mode), then consume."""
        if self._owner is None:
            await self._resume()
        topology = self._broker.topology
        for queue in (topology.events_queue, topology.runs_queue):
            self._subscriptions.append(
                await self._broker.consume(
                    queue, self._hand_over, prefetch=INBOX_PREFETCH, unreadable=self._unreadable
                )
            )
        self._loop_task = asyncio.create_task(self._loop(), name="controller")
        log.info("controller started", stack=self._stack.name)

    async def stop(self) -> None:
        """Stop consuming and finish the batch in hand; idempotent, safe before start."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            await subscription.cancel()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        while not self._inbox.empty():
            await self._inbox.get_nowait().requeue()
        for request in self._queue.take_all():
            await request.requeue()
        if self._owner is not None:
            await self._end_owned_runs()
        for delivery in self._early.release_all():
            await delivery.requeue()
        self._publisher.committed.extend(
            self._progress.release_all(asyncio.get_running_loop().time())
        )
        try:
            await self._publisher.settle(wait=True)
        except Exception as exc:
            log.warning("events not confirmed at stop", error=f"{type(exc).__name__}: {exc}")
        try:
            await self._publisher.publish_committed()
        except Exception as exc:
            # What was durable is in the outbox, republished at the next start.
            log.warning("events not published at stop", error=f"{type(exc).__name__}: {exc}")
        await self._flush_confirmed()

    async def _resume(self) -> None:
        unsent = await self._outbox.unsent(self._stack.id)
        if unsent:
            log.info("replaying outbox", events=len(unsent))
            await self._broker.publish(unsent)
            writes = Writes()
            self._outbox.mark_sent(writes, [e.event_id for e in unsent], utcnow())
            await self._db.write(writes)
        for run_id in await self._runs.active_run_ids(self._stack.id):
            self._states[run_id] = await self._loaded(run_id)
            self._timers.note_retry(run_id)
        # Deciding again tops every run up too: the steps that waited for a decision, or
        # for room under MAX_DISPATCHED, when a crash came between two transactions.
        self._undecided = set(self._states)

    async def _loaded(self, run_id: str) -> RunState:
        state = await self._runs.load_state(run_id)
        state.defer = True
        # Its ready steps are decided again (``_decide_again``, which every reload is
        # followed by) before any is dispatched: deciding one here, in the middle of a
        # batch, could miss outputs the batch is about to record.
        state.ready.clear()
        self._timers.grant(state)
        return state

    async def _decide_again(self) -> None:
        """Rebuild which keys are in flight from the runs, and decide again each step that
        waits for a decision: one that was never recorded, or a wait for an identical step
        in flight, which the rebuilt bookkeeping no longer holds."""
        runs, self._undecided = self._undecided, set()
        try:
            for run_id in runs:
                await self._state_of(run_id)  # a finished run is not kept
            batch = Batch(now=utcnow())
            self._decisions.rebuild(batch)
            await self._commit(batch)
        except BaseException:
            self._undecided |= runs
            raise

    async def _flush_confirmed(self) -> None:
        confirmed = self._publisher.take_confirmed()
        if not confirmed:
            return
        writes = Writes()
        self._outbox.mark_sent(writes, confirmed, utcnow())
        await self._db.write(writes)

    def _hand_over(self, delivery: Delivery) -> None:
        event = delivery.event
        if isinstance(event, StepsDone):
            # Each outcome is taken as if it had come alone; the message is settled with
            # the last of them.
            for part in parts(delivery, self._broker, event.outcomes):
                self._inbox.put_nowait(part)
            return
        self._inbox.put_nowait(delivery)

    async def _unreadable(self, delivery: UnreadableDelivery) -> None:
        found = stand_in(delivery.unreadable)
        if found is None:
            await delivery.reject()
        else:
            self._hand_over(UnreadableMessage(delivery, *found))

    async def _end_owned_runs(self) -> None:
        """An embedded controller stops: its runs' steps would go to a broker and workers
        that end with it, so its unfinished runs end cancelled, and the runs it queued end
        cancelled, never started (a batch cut short may have taken some of them)."""
        owned = OwnedRuns(self._db)
        try:
            await owned.end_unfinished(
                [*self._states, *self._undecided], RunStatus.CANCELLED, STOPPED
            )
            await owned.end_queued(list(self._shown_queued), RunStatus.CANCELLED, NEVER_STARTED)
        except Exception as exc:  # the next command to open the store fails them
            log.warning("runs not ended", error=f"{type(exc).__name__}: {exc}")
        self._shown_queued.clear()

    async def _loop(self) -> None:
        self._timers.start(asyncio.get_running_loop().time())
        while True:
            batch = await self._take_batch()
            try:
                await self._publisher.settle(wait=False)
                await self._publisher.publish_committed()
                if self._undecided:
                    await self._decide_again()
                batch, waiting = self._queue.admit(batch, len(self._states))
                if batch or waiting:
                    await self._process(batch, waiting)
                    batch = []  # recorded and acked: what fails from here is not its doing
                else:  # idle: note what the broker confirmed meanwhile
                    await self._flush_confirmed()
                await self._timers.check_leases()
                await self._timers.dispatch_retries()
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                    raise
                await self._failures.failed(batch, exc)
            else:
                self._failures.recovered()

    def _forget_states(self) -> None:
        """Drop the states in memory, which may be ahead of the store; they reload. Their
        steps' decisions (reuse, or dispatch) may not have been recorded: made again."""
        self._undecided |= set(self._states)
        self._states.clear()

    async def _take_batch(self) -> list[Inbound]:
        """The deliveries waiting, once there is one; none if held progress or a lease
        check falls due first."""
        loop = asyncio.get_running_loop()
        due = self._timers.due(loop.time())
        if self._queue.has_room(len(self._states)):
            due = loop.time()  # a queued run may start: take only what came meanwhile
        if self._progress.pending:
            due = min(due, self._progress.due)
        if self._publisher.in_flight:
            due = min(due, loop.time() + IDLE_FLUSH_S)
        try:
            async with asyncio.timeout_at(due):
                first = await self._inbox.get()
        except TimeoutError:
            if self._progress.pending and self._progress.due <= loop.time():
                self._publisher.committed.extend(self._progress.release_all(loop.time()))
            return []
        batch = [first]
        while len(batch) < MAX_BATCH and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())
        return [d for d in batch if await self._accepts(d)]

    async def _accepts(self, delivery: Inbound) -> bool:
        if isinstance(delivery.event, RunRequested | RunCancelRequested | WorkerEvent):
            return True
        await delivery.reject(f"the controller does not take {delivery.event.type} events")
        return False

    async def _state_of(self, run_id: str) -> RunState | None:
        state = self._states.get(run_id)
        if state is None:
            try:
                state = await self._loaded(run_id)
            except ConveyorError:
                return None
            if state.status not in (RunStatus.PENDING, RunStatus.RUNNING):
                return state  # a late event of a finished run: nothing to keep
            self._states[run_id] = state
        return state

    async def _process(self, deliveries: list[Inbound], waiting: Sequence[Inbound] = ()) -> None:
        """Record what ``deliveries`` change and ack them; ``waiting``, requests that wait in
        the run queue, are recorded queued (unacked)."""
        batch = Batch(now=utcnow())
        if self._owner is not None:  # an embedded one's: a service stack's clients record theirs
            batch.queued = [d.event for d in waiting if isinstance(d.event, RunRequested)]
        early: list[Inbound] = []
        requested: list[str] = []
        for delivery in deliveries:
            if isinstance(delivery.event, RunCancelRequested):
                batch.cancels.setdefault(delivery.event.run_id, delivery.event.reason)
            elif isinstance(delivery.event, RunRequested):
                requested.append(delivery.event.run_id)
        if requested:  # one query for the batch: 100 runs submitted at once start sooner
            batch.recorded = await self._runs.recorded(requested)
            # Runs their clients withdrew before this controller took them: recorded
            # cancelled, unstarted, as if their cancellation had come in this batch.
            for run_id, reason in (await self._run_requests.withdrawn(requested)).items():
                batch.cancels.setdefault(run_id, reason)
        for delivery in deliveries:
            event = delivery.event
            if isinstance(event, RunRequested):
                refused = delivery.error if isinstance(delivery, UnreadableMessage) else None
                await self._on_run_requested(batch, event, refused)
                continue
            if event.run_id in batch.withdrawn:
                continue
            state = await self._state_of(event.run_id)
            if state is None:
                log.warning("event of an unknown run", run_id=event.run_id, type=event.type)
            elif isinstance(event, RunCancelRequested):
                batch.change(event.run_id, scheduling.cancel_run(state, batch.now, event.reason))
            elif isinstance(event, WorkerEvent):
                if scheduling.early(state, event):
                    early.append(delivery)
                    continue
                change = scheduling.apply_event(state, event, now=batch.now)
                batch.change(event.run_id, change)
                if isinstance(event, StepStarted | StepHeartbeat):
                    self._timers.renew(state, event.step, event.attempt, batch.now)
        # Held ones are not this batch's to ack, nor to hand back should it fail: held
        # only now that nothing of the batch before its commit can fail.
        held = [d for d in early if self._early.holds(d)]
        if held:
            deliveries[:] = [d for d in deliveries if all(d is not h for h in held)]
        await self._commit(batch)
        for delivery in deliveries:
            await delivery.ack()

    async def _on_run_requested(
        self, batch: Batch, request: RunRequested, refused: str | None = None
    ) -> None:
        """Record the run of ``request`` and start it; or, if its pipeline does not compile
        or it was ``refused`` (why), record it failed."""
        for earlier, _, _ in batch.new_runs:
            if earlier.run_id == request.run_id or (
                request.idempotency_key and earlier.idempotency_key == request.idempotency_key
            ):
                return
        if request.run_id in self._states:
            return
        if request.idempotency_key and await self._runs.find_by_key(request.idempotency_key):
            return
        if request.run_id in batch.recorded:
            return  # a redelivered request of a run that exists
        error = refused
        spec = request.spec
        if error is None and spec is None:
            try:
                spec = await asyncio.to_thread(compile_request, request, self._code_store)
            except Exception as exc:
                error = readable(f"cannot compile pipeline {request.pipeline!r}: {exc}")
        if error is not None or spec is None:
            spec = PipelineSpec(name=request.pipeline, parameters=request.parameters, steps=[])
        if not request.cache:
            spec = without_cache(spec)
        batch.new_runs.append((request, spec, error))
        state = RunState.new(request.run_id, spec)
        state.defer = True
        if request.retry_of is not None and error is None:
            state.retry_of = request.retry_of
            state.previous = await self._runs.retried_steps(request.retry_of)
        if error is not None:
            state.status = RunStatus.FAILED
            batch.change(
                request.run_id,
                Transition(
                    run_status=RunStatus.FAILED,
                    run_error=error,
                    emit=[RunFinished(run_id=request.run_id, status=RunStatus.FAILED, error=error)],
                ),
            )
            return
        withdrawn = batch.cancels.get(request.run_id)
        if withdrawn is not None:
            # Its client gave up before a controller took the request (Ctrl+C while none
            # ran): nothing of it may run, not even for a moment.
            batch.withdrawn.add(request.run_id)
            batch.change(request.run_id, scheduling.cancel_run(state, batch.now, withdrawn))
            return
        self._states[request.run_id] = state
        batch.change(request.run_id, scheduling.start_run(state, batch.now))

    async def _commit(self, batch: Batch) -> None:
        await self._decisions.decide(batch)
        events = batch.events()
        durable = [e for e in events if self._kept(e)]
        writes = Writes()
        self._outbox.mark_sent(writes, self._publisher.take_confirmed(), batch.now)
        for request in batch.queued:
            assert self._owner is not None  # only an embedded controller queues them
            self._run_requests.record_queued(writes, request, self._stack, self._owner, batch.now)
        for request, spec, _ in batch.new_runs:
            self._runs.insert_run(
                writes,
                run_id=request.run_id,
                spec=spec,
                stack_id=self._stack.id,
                stack_name=self._stack.name,
                stack_snapshot=self._stack_snapshot,
                idempotency_key=request.idempotency_key,
                owner=self._owner,
                now=batch.now,
                retry_of=request.retry_of,
            )
            self._run_requests.mark_taken(writes, request.run_id)
        for run_id, change in batch.changes.items():
            self._runs.apply(writes, run_id, change, batch.now)
        self._outbox.add(writes, self._stack.id, durable, batch.now)
        await self._db.write(writes)
        self._shown_queued.update(request.run_id for request in batch.queued)
        self._shown_queued.difference_update(request.run_id for request, _, _ in batch.new_runs)
        loop = asyncio.get_running_loop()
        self._publisher.committed.extend(self._progress.outgoing(events, loop.time()))
        await self._publisher.send_committed()
        for run_id, change in batch.changes.items():
            if change.run_status is not None and change.run_status is not RunStatus.RUNNING:
                self._states.pop(run_id, None)
                log.info("run finished", run_id=run_id, status=change.run_status.value)
            self._timers.changed(run_id, change)
        for delivery in self._early.due(self._states):
            self._inbox.put_nowait(delivery)
