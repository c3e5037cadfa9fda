"""The async entry point for embedding Conveyor: submit runs to a stack and follow them.

On an embedded stack (``local`` orchestrator) the controller and a worker pool run in this
process; on a service stack (``rabbitmq``) this only publishes and follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ArtifactStore,
    Broker,
    ComponentType,
    ConveyorError,
    Event,
    NotFoundError,
    PipelineSpec,
    RunCancelRequested,
    RunFinished,
    RunProgress,
    RunRecord,
    RunRequested,
    StackSpec,
    StepRecord,
    StepStatus,
    StepStatusChanged,
    Subscription,
    Unreadable,
    new_id,
    utcnow,
)
from conveyor.service.context import Services
from conveyor.service.controller import Controller
from conveyor.service.failures import failure_of
from conveyor.service.home import Home
from conveyor.service.idempotency import check_reused_key
from conveyor.service.liveness import this_process
from conveyor.service.login import no_engine_when_logged_in, read_login
from conveyor.service.pipelines import PipelineDefinition, load_pipeline
from conveyor.workers.code_archive import attach_code
from conveyor.workers.execution import load_artifact
from conveyor.workers.flavors import (
    LocalOrchestratorConfig,
    get_flavor,
    make_artifact_store,
    make_broker,
    orchestrator_config,
)
from conveyor.workers.loggers import get_logger
from conveyor.workers.release import cannot_read
from conveyor.workers.runtime import WorkerPool
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import StepDefinition, importing_run_code

log = get_logger("conveyor.engine")

WITHDRAW_TIMEOUT_S = 3.0
"""How long an interrupted caller waits for the broker to take a run's cancellation."""
CANCEL_WAIT_S = 5.0
"""How long it then waits for the cancellation to be recorded."""
EMBEDDED_ANNOUNCE_AFTER_S = 0.1
"""A step of the embedded stack that finishes sooner is not announced (no StepStarted): its
completion says it all, at half the controller's work for a short step."""

EMBEDDED_REMEMBERED_OUTCOMES = 1_000
"""Outcomes the embedded worker pool remembers (a RabbitMQ worker: 10,000). The in-process
broker delivers a StepReady again only when its consumer stops with the delivery unsettled,
so at most a prefetch per pool is ever asked about; each remembered outcome holds its event
and output references (about 2 KB), 20 MB for 10,000."""

StepCallback = Callable[[StepStatusChanged], Awaitable[None] | None]


class AsyncRun:
    """A submitted run: wait for it, read its steps, load its outputs."""

    def __init__(
        self,
        run_id: str,
        conveyor: Conveyor,
        on_step: StepCallback | None,
        spec: PipelineSpec | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        self.id = run_id
        self._key = idempotency_key
        self._conveyor = conveyor
        self._on_step = on_step
        self._finished = asyncio.Event()
        self._subscription: Subscription | None = None
        # What the status events said, for a client whose store does not hold the run (a
        # service stack's controller records it in its own store, maybe on another machine).
        self._spec = spec
        self._created = utcnow()
        self._statuses: dict[str, StepStatusChanged] = {}
        self._outcome: RunFinished | None = None
        # Why the run's end could not be read (a newer controller's RunFinished), if so.
        self._unreadable_end: str | None = None
        self._told_unreadable = False

    async def _follow(self) -> None:
        self._subscription = await self._conveyor.broker.follow(
            self.id, self._on_status, unreadable=self._on_unreadable
        )

    def _on_unreadable(self, message: Unreadable) -> None:
        """A status event of this run that this release cannot read: a step change only
        goes unseen (said once), but an unreadable end would be waited for for ever."""
        what = message.identity.type
        error = cannot_read(
            "client", f"run's {what}", "controller", message.reason, message.sender_version
        )
        if what == "RunFinished":
            self._unreadable_end = error
            self._finished.set()
        elif not self._told_unreadable:
            self._told_unreadable = True
            log.warning("run status unreadable", run_id=self.id, error=error)

    async def _on_status(self, event: Event) -> None:
        changes = event.changes if isinstance(event, RunProgress) else [event]
        for change in changes:
            if isinstance(change, StepStatusChanged):
                await self._on_change(change)
        if isinstance(event, RunFinished):
            self._outcome = event
            self._finished.set()

    async def _on_change(self, change: StepStatusChanged) -> None:
        if self._conveyor.controller_alive is None:
            # Only a client whose store does not hold the run reads them back; an embedded
            # run's store does, and a fan-out of 100,000 would keep as many events here.
            self._statuses[change.step] = change
        if self._on_step is not None:
            result = self._on_step(change)
            if result is not None:
                await result

    async def wait(
        self,
        timeout: float | None = None,
        *,
        raise_on_failure: bool = False,
        on_waiting: Callable[[str], None] | None = None,
    ) -> RunRecord:
        """Wait until the run finished; its record. With ``raise_on_failure``, a run that
        failed or was cancelled raises ``RunFailed`` (``.run`` is this AsyncRun) instead.

        On a service stack, a controller or worker the run waits for and that nobody runs is
        told through ``on_waiting`` (default: a warning in the logs), with the command that
        starts it, and again when one comes.
        """
        watch = self._watch_consumers(on_waiting)
        try:
            await self._until_finished(timeout)
        finally:
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        if self._unreadable_end is not None and not await self._stored_end():
            await self.close()
            raise ConveyorError(
                f"run {self.id} ended, but how is not known here: {self._unreadable_end}"
            )
        if self._conveyor.controller_alive is None:
            await self._conveyor.services.run_requests.forget(self.id)
        await self.close()
        record = await self.record()
        failure = failure_of(record, await self.steps(), self) if raise_on_failure else None
        if failure is not None:
            raise failure
        return record

    def _watch_consumers(self, say: Callable[[str], None] | None) -> asyncio.Task[None] | None:
        stack = self._conveyor.stack
        if self._conveyor.controller_alive is not None or self._spec is None or stack is None:
            return None  # embedded: this process is the whole stack
        from conveyor.service.consumers import watch_consumers

        def warn(text: str) -> None:
            log.warning("run waits for a consumer", run_id=self.id, problem=text)

        pools = {step.pool for step in self._spec.steps}
        topology = self._conveyor.broker.topology
        return asyncio.create_task(watch_consumers(stack, topology, pools, say or warn))

    async def _until_finished(self, timeout: float | None) -> None:
        while True:
            try:
                await asyncio.wait_for(self._finished.wait(), timeout=timeout or 2.0)
                break
            except TimeoutError:
                # A missed status event must not hang the caller: look at the store too.
                if await self._stored_end():
                    break
                # The controller in this process cannot record anything (its store is full,
                # say): waiting on would never end.
                problem = self._conveyor.controller_problem
                if problem is not None:
                    raise ConveyorError(f"run {self.id} cannot go on: {problem}") from None
                if timeout is not None:
                    raise

    async def _stored_end(self) -> bool:
        """Whether the store this client reads holds the run finished."""
        record = await self._stored()
        return record is not None and record.status in FINISHED_RUN_STATUSES

    async def _stored(self) -> RunRecord | None:
        """The run as the store holds it now, if it does.

        A request that lost its idempotency key to another submitted at the same time is
        dropped by the controller: this run then becomes the one that has the key, if it is
        the same request, and is refused (``ConflictError``) if it is not.
        """
        runs = self._conveyor.services.runs
        try:
            return await runs.run_by_id(self.id)
        except ConveyorError:
            pass
        stack = self._conveyor.stack
        if self._key is None or self._spec is None or stack is None:
            return None
        holder = await runs.find_by_key(self._key)
        if holder is None or holder.id == self.id:
            return None
        check_reused_key(self._key, holder, self._spec, stack.id)
        await self.close()
        self.id = holder.id
        await self._follow()
        return holder

    async def interrupt(self, reason: str, say: Callable[[str], None]) -> None:
        """Cancel the run its caller was interrupted while waiting for (Ctrl+C, a kernel
        interrupt), telling ``say`` what became of it, rather than leave it to run on.

        A request no controller has taken yet is withdrawn at once; otherwise the
        cancellation is waited for a few seconds, to be recorded.
        """
        try:
            async with asyncio.timeout(WITHDRAW_TIMEOUT_S):
                await self._conveyor.cancel(self.id, reason)
        except TimeoutError:
            say(f"The broker did not take the cancellation in {WITHDRAW_TIMEOUT_S:g}s")
            return
        except ConveyorError as exc:
            say(f"The cancellation was not sent: {exc}")
            return
        if self._conveyor.controller_alive is None and not self._statuses:
            # One that takes it later reads the cancellation with it: cancelled, unstarted.
            say(f"Run {self.id} withdrawn: no controller had taken it")
            return
        with contextlib.suppress(TimeoutError, ConveyorError):
            await self.wait(timeout=CANCEL_WAIT_S)

    async def close(self) -> None:
        """Stop following the run's status events (the run goes on); idempotent."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.cancel()

    async def record(self) -> RunRecord:
        runs = self._conveyor.services.runs
        try:
            return await runs.run_by_id(self.id)
        except NotFoundError:
            if self._outcome is None:  # queued (no controller took it yet), or unknown here
                return await runs.get_run(self.id)
            if self._spec is None or self._conveyor.stack is None:
                raise
        stack = self._conveyor.stack
        return RunRecord(
            id=self.id,
            pipeline=self._spec.name,
            stack_id=stack.id,
            stack_name=stack.name,
            stack_snapshot=stack.model_dump(mode="json"),
            status=self._outcome.status,
            parameters=self._spec.parameters,
            created=self._created,
            started=self._created,
            finished=self._outcome.time,
            error=self._outcome.error,
        )

    async def steps(self) -> list[StepRecord]:
        try:
            return await self._conveyor.services.runs.steps_of(self.id)
        except NotFoundError:
            if self._spec is None:
                raise
        records = []
        for spec in self._spec.steps:
            seen = self._statuses.get(spec.name)
            records.append(
                StepRecord(
                    run_id=self.id,
                    name=spec.name,
                    status=seen.status if seen else StepStatus.PENDING,
                    attempt=seen.attempt if seen else 0,
                    max_retries=spec.retries,
                    duration_s=seen.duration_s if seen else None,
                    error=seen.error if seen else None,
                    upstream=spec.upstream,
                    outputs=seen.outputs if seen else {},
                    cached_from=seen.cached_from if seen else None,
                )
            )
        return records

    async def load(
        self,
        step: str,
        output: str = "output",
        *,
        allow_pickle: bool = False,
        trust: Sequence[str] = (),
    ) -> Any:
        """The value of one output, read back from the artifact store (``trust``: see
        ``RunHandle.load``)."""
        for record in await self.steps():
            if record.name == step and output in record.outputs:
                ref = record.outputs[output]
                return await asyncio.to_thread(
                    load_artifact,
                    self._conveyor.artifacts,
                    ref,
                    allow_pickle=allow_pickle,
                    trust=trust,
                )
        raise ConveyorError(f"run {self.id} has no output {output!r} of step {step!r}")


class Conveyor:
    """Submit and follow runs on one stack from inside an asyncio program.

    It leaves the program's logging as it is: structlog is configured by the program (or by
    ``conveyor.service.logs.configure_logging`` when the program asks for it), never here.

    ``async with Conveyor() as cv: run = await cv.submit(my_pipeline, x=1); await run.wait()``
    """

    def __init__(self, *, home: str | Path | Home | None = None, stack: str | None = None) -> None:
        self._home = home
        self._stack_name = stack
        self._services: Services | None = None
        self._broker: Broker | None = None
        self._artifacts: ArtifactStore | None = None
        self._controller: Controller | None = None
        self._workers: WorkerPool | None = None
        self._store_checked = False
        self.stack: StackSpec | None = None

    async def __aenter__(self) -> Conveyor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("Conveyor is not started")
        return self._services

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("Conveyor is not started")
        return self._broker

    @property
    def artifacts(self) -> ArtifactStore:
        if self._artifacts is None:
            raise RuntimeError("Conveyor is not started")
        return self._artifacts

    @property
    def controller_alive(self) -> bool | None:
        """Whether this process's controller runs (``None``: the stack's runs elsewhere)."""
        return None if self._controller is None else self._controller.alive

    @property
    def controller_problem(self) -> str | None:
        """Why this process's controller cannot get on (its store fails, say), or None."""
        return None if self._controller is None else self._controller.problem

    async def start(self) -> None:
        """Open the store; on an embedded stack, start the controller and workers."""
        if self._services is not None:
            return
        imported = importing_run_code.get()
        if imported is not None:
            raise ConveyorError(
                f"{imported} starts a run when it is imported: a worker imports it to find "
                "the run's steps, and a run started there would wait for that worker; put "
                'the code that runs pipelines under `if __name__ == "__main__":`'
            )
        if self._home is None:
            # Named explicitly (the server names its own), a home is used as it is.
            login = read_login(Home.resolve())
            if login is not None:
                raise no_engine_when_logged_in(login)
        self._services = services = await Services.open(self._home)
        try:
            self.stack = stack = await services.stacks.resolve(self._stack_name)
            self._artifacts = make_artifact_store(stack)
            self._broker = make_broker(stack)
            await self._broker.start()
            orchestrator = stack.component(ComponentType.ORCHESTRATOR)
            if get_flavor(orchestrator.type, orchestrator.flavor).embedded:
                config = orchestrator_config(stack)
                assert isinstance(config, LocalOrchestratorConfig)
                self._controller = Controller(
                    services.db,
                    self._broker,
                    stack,
                    owner=this_process(),
                    artifacts=self._artifacts,
                    max_active_runs=config.max_active_runs,
                )
                await self._controller.start()
                self._workers = WorkerPool(
                    self._broker,
                    self._artifacts,
                    resolver=StepResolver(self._artifacts, in_process=True),
                    concurrency=config.concurrency,
                    announce_after=EMBEDDED_ANNOUNCE_AFTER_S,
                    remembered_outcomes=EMBEDDED_REMEMBERED_OUTCOMES,
                )
                await self._workers.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop workers, controller, broker, store, in that order; idempotent."""
        workers, self._workers = self._workers, None
        if workers is not None:
            await workers.stop()
        controller, self._controller = self._controller, None
        if controller is not None:
            await controller.stop()
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.stop()
        services, self._services = self._services, None
        if services is not None:
            await services.close()

    async def submit(
        self,
        pipeline: PipelineDefinition | str,
        *args: Any,
        idempotency_key: str | None = None,
        on_step: StepCallback | None = None,
        cache: bool = True,
        **parameters: Any,
    ) -> AsyncRun:
        """Compile ``pipeline`` with these parameters and start a run of it.

        An ``idempotency_key`` that a run has already is answered with that run if this is
        the same request (pipeline, parameters, stack), and refused with ``ConflictError``
        otherwise. ``cache=False`` runs every step, reusing no earlier run's outputs."""
        definition = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        spec, definitions = definition.compile(*args, **parameters)
        return await self.submit_compiled(
            spec, definitions, idempotency_key=idempotency_key, on_step=on_step, cache=cache
        )

    async def submit_compiled(
        self,
        spec: PipelineSpec,
        definitions: dict[str, StepDefinition],
        *,
        idempotency_key: str | None = None,
        on_step: StepCallback | None = None,
        cache: bool = True,
        retry_of: str | None = None,
        code_attached: bool = False,
    ) -> AsyncRun:
        """Start a run of a pipeline compiled already (``PipelineDefinition.compile``),
        for a caller that compiles off the event loop. ``retry_of`` names a failed or
        cancelled run whose completed steps this run reuses (``Client.retry_run``).
        ``code_attached``: the steps name their code archives already (a spec a client
        compiled and submitted to a server) and ``definitions`` may be empty."""
        # A service stack's steps travel as code archives, packed here unless a client did.
        pack = self._workers is None and not code_attached
        if self._workers is not None:
            self._workers.resolver.add(definitions)
            await self._workers.serve(step.pool for step in spec.steps)
        assert self.stack is not None
        if idempotency_key:
            if pack:  # the key is checked against the spec as it runs, with its code
                spec, pack = await self._with_code(spec, definitions), False
            existing = await self.services.runs.find_seen_by_key(idempotency_key)
            if existing is not None:
                check_reused_key(idempotency_key, existing, spec, self.stack.id)
                run = AsyncRun(existing.id, self, on_step)
                await run._follow()
                return run
        run = AsyncRun(new_id(), self, on_step, spec, idempotency_key)
        run._spec = spec = await self._followed(run, spec, definitions if pack else None)
        return await self._request(run, spec, idempotency_key, cache, retry_of)

    async def _request(
        self,
        run: AsyncRun,
        spec: PipelineSpec,
        idempotency_key: str | None,
        cache: bool,
        retry_of: str | None,
    ) -> AsyncRun:
        """Publish the request of ``run``, followed already."""
        assert self.stack is not None
        if self._workers is None:  # a service stack: queued until its controller records it
            await self.services.run_requests.record(
                run.id, spec, self.stack, idempotency_key, utcnow()
            )
        request = RunRequested(
            run_id=run.id,
            pipeline=spec.ref or spec.name,
            parameters=spec.parameters,
            stack=self.stack.name,
            idempotency_key=idempotency_key,
            cache=cache,
            retry_of=retry_of,
        )
        # The spec was checked as it was built (compiled, or parsed): validated again in the
        # request, its DAG would be walked once more (30 ms for 50,000 steps).
        await self.broker.publish([request.model_copy(update={"spec": spec})])
        return run

    async def _with_code(
        self, spec: PipelineSpec, definitions: dict[str, StepDefinition]
    ) -> PipelineSpec:
        """``spec`` with its steps' source packed into code archives in the stack's store,
        for workers on other machines; the store is checked once, on first use."""
        if not self._store_checked:
            await asyncio.to_thread(self.artifacts.check)
            self._store_checked = True
        return await asyncio.to_thread(attach_code, spec, definitions, self.artifacts)

    async def _followed(
        self,
        run: AsyncRun,
        spec: PipelineSpec,
        definitions: dict[str, StepDefinition] | None,
    ) -> PipelineSpec:
        """Follow ``run``; with ``definitions``, pack its code (a thread) meanwhile and
        return ``spec`` with it. The run is not followed if either fails."""
        if definitions is None:
            await run._follow()
            return spec
        try:
            # Both end before gather() returns, or raises (cancelled): no follow outlives it.
            coded, followed = await asyncio.gather(
                self._with_code(spec, definitions), run._follow(), return_exceptions=True
            )
        except BaseException:
            await run.close()
            raise
        for outcome in (coded, followed):
            if isinstance(outcome, BaseException):
                await run.close()
                raise outcome
        assert isinstance(coded, PipelineSpec)
        return coded

    async def cancel(self, run_id: str, reason: str = "cancelled by user") -> None:
        """Ask the stack's controller to cancel a run; it stops the run's running attempts."""
        if self._workers is None:
            # A request no controller took is withdrawn, on record first: a controller that
            # takes it from now on records the run cancelled, unstarted, however late the
            # cancellation below reaches it.
            await self.services.run_requests.withdraw(run_id, reason, utcnow())
        await self.broker.publish([RunCancelRequested(run_id=run_id, reason=reason)])
