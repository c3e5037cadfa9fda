"""Submitting and cancelling runs for the server: one ``Conveyor`` per stack it serves.

Each stack gets a ``Conveyor`` (and so, on an embedded stack, its controller and workers)
per revision (its components as they are now): the stack the server was started for at
start-up, another stack named in a request on first use. A run goes to its stack's current
revision, the served stack's too: once an admin changed that stack, the next run gets a new
``Conveyor``. The ``Conveyor`` of a revision that was superseded (the stack's components
changed, or it was deleted) is stopped once the runs submitted through it ended; a run goes
on, and is cancelled, through the ``Conveyor`` it was submitted through. The store the API
reads is the gateway's own, so that stopping any ``Conveyor`` leaves it open.

A submission returns once the controller has recorded the run, so that an HTTP client gets
a run it can read, and so that an idempotency key is settled before the next request with
the same key is looked at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from conveyor.contracts import (
    FINISHED_RUN_STATUSES,
    ComponentType,
    ConflictError,
    ConveyorError,
    NotFoundError,
    PipelineSpec,
    RunRecord,
    RunStatus,
    StackSpec,
    ValidationError,
    utcnow,
)
from conveyor.contracts.limits import DEFAULT_MAX_STEPS
from conveyor.service.context import Services
from conveyor.service.engine import Conveyor
from conveyor.service.home import Home
from conveyor.service.idempotency import check_reused_key
from conveyor.service.liveness import this_process
from conveyor.service.pipelines import PipelineTooLarge, load_pipeline
from conveyor.service.stacks import StackService
from conveyor.workers.flavors import get_flavor
from conveyor.workers.loggers import get_logger
from conveyor.workers.steps import StepDefinition, readable

log = get_logger("conveyor.server")

RESERVED_PARAMETERS = frozenset({"idempotency_key", "on_step", "cache"})
MAX_COMPILING = 2
"""Pipelines compiled at once; more wait. A thread cannot be stopped, so they are few."""
SWEEP_INTERVAL_S = 5.0
"""How often the ``Conveyor`` of each superseded stack revision is looked at (and stopped
once its runs ended)."""


@dataclass(frozen=True)
class Submission:
    """The outcome of a submit: the run, whether this call created it, whether it is stored."""

    run: RunRecord
    created: bool
    recorded: bool


class _KeyLocks:
    """One lock per idempotency key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass(eq=False)
class _Engine:
    """The ``Conveyor`` of one stack revision, and what it is busy with."""

    conveyor: Conveyor
    revision: str
    runs: set[str] = field(default_factory=set)
    """Runs submitted through it and not seen finished yet."""
    submitting: int = 0
    """Submissions under way through it (their runs are not in ``runs`` yet)."""


@dataclass(frozen=True)
class _Compiled:
    spec: PipelineSpec
    steps: dict[str, StepDefinition]
    code_attached: bool = False
    """The spec's steps name their code archives already (a client compiled it)."""


def _compile(ref: str, parameters: dict[str, Any], max_steps: int) -> _Compiled:
    """Import and compile the pipeline ``ref``: user code, so in a thread, never on the loop."""
    try:
        definition = load_pipeline(ref)
    except ConveyorError as exc:
        raise ValidationError(str(exc)) from None
    try:
        spec, steps = definition.compile_within(max_steps, (), parameters)
    except PipelineTooLarge as exc:
        raise PipelineTooLarge(
            f"{exc}; this server compiles at most {max_steps} (conveyor server up --max-steps)"
        ) from None
    except ConveyorError:
        raise
    except Exception as exc:
        # The pipeline function failed on these parameters: the request's fault, not ours.
        raise ValidationError(
            f"pipeline {ref!r} failed while building its DAG with these parameters: "
            + readable(f"{type(exc).__name__}: {exc}")
        ) from None
    return _Compiled(spec, steps)


class RunGateway:
    """Submits and cancels runs through the ``Conveyor`` of each stack.

    Lifecycle: ``start()``, then ``stop()`` (idempotent, safe before start).
    """

    def __init__(
        self, home: Home, *, record_timeout: float = 5.0, max_steps: int = DEFAULT_MAX_STEPS
    ) -> None:
        self._home = home
        self._record_timeout = record_timeout
        self._max_steps = max_steps
        self._compiling = asyncio.Semaphore(MAX_COMPILING)
        self._services: Services | None = None
        self._served: _Engine | None = None
        """The engine of the served stack's newest revision."""
        self._engines: dict[str, _Engine] = {}
        """A ``Conveyor`` per revision of a stack (``_revision``), the served one's too."""
        self._opening = asyncio.Lock()
        self._keys = _KeyLocks()
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def served(self) -> Conveyor:
        """The ``Conveyor`` of the served stack's newest revision (the one it was started
        for, until an admin changes that stack and a run is submitted to it)."""
        if self._served is None:
            raise RuntimeError("RunGateway is not started")
        return self._served.conveyor

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("RunGateway is not started")
        return self._services

    @property
    def stack(self) -> StackSpec:
        stack = self.served.stack
        assert stack is not None
        return stack

    async def stack_named(self, stacks: StackService, name: str | None) -> StackSpec:
        """Stack ``name`` (a name or an id) as ``stacks`` (a user's view) shows it. Without a
        name, the server's own: renamed or not; deleted and made again under its name, the
        new one."""
        if name:
            return await stacks.get(name)
        try:
            return await stacks.get(self.stack.id)
        except NotFoundError:
            return await stacks.get(self.stack.name)

    def conveyors(self) -> list[Conveyor]:
        """Every started ``Conveyor``, the served one first."""
        served = self.served
        return [served, *(e.conveyor for e in self._engines.values() if e.conveyor is not served)]

    async def start(self, stack: str | None = None) -> None:
        """Start the ``Conveyor`` of ``stack`` (default: the active stack)."""
        if self._services is not None:
            return
        services = self._services = await Services.open(self._home)
        try:
            served = await services.stacks.resolve(stack)
            async with self._opening:
                self._served = await self._opened(served)
        except BaseException:
            await self.stop()
            raise
        self._sweeper = asyncio.create_task(self._sweep_now_and_then(), name="gateway sweeper")

    async def stop(self) -> None:
        """Stop every ``Conveyor`` (others first, the served one last), then the store."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        engines, self._engines = self._engines, {}
        served, self._served = self._served, None
        for engine in engines.values():
            if engine is not served:
                await engine.conveyor.stop()
        if served is not None:
            await served.conveyor.stop()
        services, self._services = self._services, None
        if services is not None:
            await services.close()

    async def conveyor_for(self, stack_name: str | None) -> Conveyor:
        """The ``Conveyor`` of ``stack_name`` (default: the served stack) as it is now,
        started on first use."""
        return (await self._engine_for(stack_name)).conveyor

    async def _engine_for(self, stack_name: str | None) -> _Engine:
        """The engine of the current revision of ``stack_name`` (``None``: the served one)."""
        # A new Conveyor starts once a stack's name or components changed (or it was deleted
        # and made again under its name): a run goes to the stack as it is now. The older one
        # stays until its runs ended (``sweep``), so that those can still be followed and
        # cancelled.
        stack = await self.stack_named(self.services.stacks, stack_name)
        async with self._opening:
            engine = await self._opened(stack)
            if stack.id == self.stack.id and engine is not self._served:
                log.info("the served stack changed: new runs go to its new revision")
                self._served = engine
            return engine

    async def _opened(self, stack: StackSpec) -> _Engine:
        """The engine of ``stack``'s revision, started if there is none (under ``_opening``)."""
        revision = _revision(stack)
        found = self._engines.get(revision)
        if found is None:
            conveyor = Conveyor(home=self._home, stack=stack.id)
            await conveyor.start()
            found = self._engines[revision] = _Engine(conveyor, revision)
        return found

    async def _sweep_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # the store failed for a moment: the next round tries again
                log.warning("could not look for idle engines of old stacks", exc_info=True)

    async def sweep(self) -> None:
        """Stop the ``Conveyor`` of each superseded stack revision whose runs all ended."""
        idle: list[_Engine] = []
        async with self._opening:
            for revision, engine in list(self._engines.items()):
                # Every engine forgets its finished runs, so that the set stays small.
                if engine.runs:
                    engine.runs = await self.services.runs.unfinished(sorted(engine.runs))
                if engine.runs or engine.submitting or engine is self._served:
                    continue
                stack = engine.conveyor.stack
                assert stack is not None
                try:
                    current = _revision(await self.services.stacks.get(stack.id)) == revision
                except NotFoundError:
                    current = False
                if not current:
                    del self._engines[revision]
                    idle.append(engine)
        for engine in idle:
            stack = engine.conveyor.stack
            assert stack is not None
            log.info("stopping the engine of an old stack revision", stack=stack.name)
            await engine.conveyor.stop()

    async def submit(
        self,
        pipeline: str,
        parameters: dict[str, Any],
        *,
        stack: str | None = None,
        idempotency_key: str | None = None,
        cache: bool = True,
        retry_of: str | None = None,
    ) -> Submission:
        """Start a run of ``pipeline`` (an importable reference) and wait until it is stored.

        With an ``idempotency_key`` that a run already has, that run is the answer; a key
        reused for another pipeline, other parameters or another stack is refused.
        """
        reserved = RESERVED_PARAMETERS & parameters.keys()
        if reserved:
            raise ValidationError(f"parameter names reserved by Conveyor: {sorted(reserved)}")
        async with self._compiling:
            compiled = await asyncio.to_thread(_compile, pipeline, parameters, self._max_steps)
        return await self._keyed(compiled, stack, idempotency_key, cache, retry_of)

    async def submit_spec(
        self,
        spec: PipelineSpec,
        *,
        stack: str | None = None,
        idempotency_key: str | None = None,
        cache: bool = True,
        retry_of: str | None = None,
    ) -> Submission:
        """Start a run of a pipeline a client compiled, whose steps' code archives are in
        the stack's store already (checked by ``service.api.submitted_code``); as ``submit``
        otherwise. Nothing of it is imported here."""
        compiled = _Compiled(spec, {}, code_attached=True)
        return await self._keyed(compiled, stack, idempotency_key, cache, retry_of)

    async def _keyed(
        self,
        compiled: _Compiled,
        stack: str | None,
        idempotency_key: str | None,
        cache: bool,
        retry_of: str | None,
    ) -> Submission:
        engine = await self._engine_for(stack)
        engine.submitting += 1  # no await since it was found: a sweep cannot have stopped it
        try:
            submission = await self._keyed_on(
                engine.conveyor, compiled, idempotency_key, cache, retry_of
            )
        finally:
            engine.submitting -= 1
        if submission.created:
            engine.runs.add(submission.run.id)
        return submission

    async def _keyed_on(
        self,
        conveyor: Conveyor,
        compiled: _Compiled,
        idempotency_key: str | None,
        cache: bool,
        retry_of: str | None,
    ) -> Submission:
        if idempotency_key is None:
            return await self._submit(conveyor, compiled, None, cache, retry_of)
        async with self._keys.hold(idempotency_key):
            existing = await self.services.runs.find_seen_by_key(idempotency_key)
            if existing is None:
                return await self._submit(conveyor, compiled, idempotency_key, cache, retry_of)
        target = conveyor.stack
        assert target is not None
        check_reused_key(idempotency_key, existing, compiled.spec, target.id)
        return Submission(existing, created=False, recorded=True)

    async def _submit(
        self,
        conveyor: Conveyor,
        compiled: _Compiled,
        key: str | None,
        cache: bool,
        retry_of: str | None,
    ) -> Submission:
        run = await conveyor.submit_compiled(
            compiled.spec,
            compiled.steps,
            idempotency_key=key,
            cache=cache,
            retry_of=retry_of,
            code_attached=compiled.code_attached,
        )
        await run.close()  # the dashboard reads the store; nothing here follows the run
        record = await self._recorded(run.id, key, embedded=conveyor.controller_alive is not None)
        if record is not None:
            return Submission(record, created=record.id == run.id, recorded=True)
        # The stack's controller has not started it yet (a service controller may be down,
        # an embedded one may have runs enough going): the request is queued, and the run
        # will appear under this id.
        stack = conveyor.stack
        assert stack is not None
        queued = RunRecord(
            id=run.id,
            pipeline=compiled.spec.name,
            stack_id=stack.id,
            stack_name=stack.name,
            status=RunStatus.QUEUED,
            parameters=compiled.spec.parameters,
            created=utcnow(),
            idempotency_key=key,
        )
        return Submission(queued, created=True, recorded=False)

    async def _recorded(self, run_id: str, key: str | None, *, embedded: bool) -> RunRecord | None:
        """The run's record once its controller recorded it; None while it is queued (an
        embedded stack's run queue holds it, or a service stack's controller has not taken
        it within the record timeout)."""
        runs = self.services.runs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._record_timeout
        while True:
            try:
                return await runs.run_by_id(run_id)
            except NotFoundError:
                pass
            # Queued behind max_active_runs: it starts when earlier runs end, maybe hours on.
            if embedded and await self.services.run_requests.is_requested(run_id):
                return None
            # Another process may have won the key: the controller then drops our request.
            if key is not None and (existing := await runs.find_by_key(key)) is not None:
                return existing
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.02)

    async def cancel(self, run_id: str, reason: str = "cancelled by user") -> RunRecord:
        """Ask the controller of the run's stack to cancel it; the record once it took."""
        services = self.services
        run = await services.runs.get_run(run_id)
        if run.status in FINISHED_RUN_STATUSES:
            raise ConflictError(
                f"run {run.id} is {run.status.value} already; only a pending or running run "
                "can be cancelled"
            )
        try:
            stack = await services.stacks.get(run.stack_id)
        except NotFoundError:
            raise ConflictError(
                f"run {run.id} ran on stack {run.stack_name!r}, which no longer exists"
            ) from None
        orchestrator = stack.component(ComponentType.ORCHESTRATOR)
        if get_flavor(orchestrator.type, orchestrator.flavor).embedded:
            await self._check_owned(run)
        await (await self._conveyor_of(run.id, stack.id)).cancel(run.id, reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._record_timeout
        while loop.time() < deadline:
            run = await services.runs.get_run(run.id)
            if run.status in FINISHED_RUN_STATUSES:
                break
            await asyncio.sleep(0.02)
        return run

    async def _conveyor_of(self, run_id: str, stack_name: str) -> Conveyor:
        """The ``Conveyor`` a run was submitted through (an older revision's, perhaps): on an
        embedded stack, only its controller runs the run."""
        for engine in self._engines.values():
            if run_id in engine.runs:
                return engine.conveyor
        return await self.conveyor_for(stack_name)

    async def _check_owned(self, run: RunRecord) -> None:
        # An embedded stack's controller lives in the process that submitted the run; only
        # that process's broker reaches it.
        host = this_process()[0]
        owned = await self.services.owned_runs.active(host)
        queued = await self.services.owned_runs.queued(host)  # in a run queue, unstarted
        for run_id, owner_pid, _ in [*owned, *queued]:
            if run_id == run.id:
                if owner_pid == os.getpid():
                    return
                raise ConflictError(
                    f"run {run.id} runs on the embedded stack {run.stack_name!r} inside "
                    f"another process (pid {owner_pid}); cancel it from there"
                )
        raise ConflictError(
            f"run {run.id} runs on the embedded stack {run.stack_name!r} of another "
            "process; cancel it from there"
        )


def _revision(stack: StackSpec) -> str:
    """What a started ``Conveyor`` of ``stack`` depends on: its id, its name (its runs record
    it, and a rabbitmq stack's queues are named after it) and its components."""
    parts = [stack.id, stack.name] + [
        f"{c.id}:{c.flavor}:{json.dumps(c.config, sort_keys=True, default=str)}"
        for _, c in sorted(stack.components.items())
    ]
    return "\n".join(parts)
