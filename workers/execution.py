"""Running one attempt of a step: load inputs, call the body, persist outputs.

Blocking work (file I/O, hashing) runs in a thread pool with the caller's context copied,
so log bindings survive and the event loop stays free. A sync body runs in a thread of its
own, or in a child process (``isolation="process"``, see ``step_process``): either way a
timeout or a cancellation frees the attempt's slot at once. An abandoned thread runs on in
the background and its result is dropped; a child process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from conveyor.contracts import (
    ArtifactRef,
    ArtifactStore,
    ConveyorError,
    Isolation,
    StepFailed,
    StepReady,
    StepSucceeded,
    UntrustedStep,
    WorkerFacts,
)
from conveyor.contracts.events import MAX_STEP_ERROR_LENGTH, MAX_TRACEBACK_LENGTH, trusted
from conveyor.workers import digests, materializers, script_classes, step_logs, step_process
from conveyor.workers.loggers import get_logger
from conveyor.workers.recent_blobs import RecentBlobs
from conveyor.workers.step_failures import (
    error_line,
    keep_head,
    keep_tail,
    retry_after,
    user_traceback,
)
from conveyor.workers.step_process import StepBodyFailed
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.step_threads import Settler, StepThreads
from conveyor.workers.steps import StepDefinition, readable

T = TypeVar("T")
log = get_logger("conveyor.worker")


SMALL = 1 << 20
"""Values up to this size, when their materializer keeps them in memory, are read at once."""


def load_artifact(
    store: ArtifactStore,
    ref: ArtifactRef,
    *,
    allow_pickle: bool,
    trust: Iterable[str] = (),
    recent: RecentBlobs | None = None,
) -> Any:
    """The value of a persisted artifact, verified against its digest; ``trust`` names the
    types a materializer that refuses unknown ones (skops) may build. A small one this
    worker stored lately is read from ``recent``."""
    materializer = materializers.by_name(ref.materializer, allow_pickle=allow_pickle)
    if materializers.in_memory(materializer) and ref.size <= SMALL:
        data = None if recent is None else recent.get(ref.digest)
        if data is None:
            data = store.get_bytes(ref.uri, ref.digest)
        return materializer.parse(data, ref)
    with materializers.trusting(trust):
        return store.get(ref.uri, ref.digest, lambda path: materializer.load(path, ref))


def load_artifact_file(
    path: Path, ref: ArtifactRef, *, allow_pickle: bool, trust: Iterable[str] = ()
) -> Any:
    """The value of an artifact whose bytes (already verified) are the file ``path``: what a
    client logged in to a server loads after downloading them."""
    materializer = materializers.by_name(ref.materializer, allow_pickle=allow_pickle)
    with materializers.trusting(trust):
        return materializer.load(str(path), ref)


def save_artifact(
    store: ArtifactStore,
    value: object,
    *,
    allow_pickle: bool,
    what: str,
    recent: RecentBlobs | None = None,
    run_id: str = "",
) -> ArtifactRef:
    """Persist ``value``, an output of the run ``run_id``; ``what`` names it in the error if
    no materializer fits. A small one is kept in ``recent`` too, for the steps after it on
    this worker."""
    materializer = materializers.choose(value, allow_pickle=allow_pickle, what=what)
    if materializers.in_memory(materializer):
        # A small value is bytes already: hashed first, it is not written at all when its
        # content address is taken (a re-executed step, a value many runs produce).
        data = materializer.dump(value)
        if recent is None:
            blob = store.put_bytes(data)
        else:
            blob = recent.stored_for(run_id, digests.of_bytes(data)) or store.put_bytes(data)
            recent.keep(blob, data, run_id)
    else:
        blob = store.put(lambda path: materializer.save(value, path))
    return ArtifactRef.of(
        blob,
        materializer=materializer.name,
        version=materializer.version,
        data_type=materializers.type_name(value),
    )


def store_file(store: ArtifactStore, output: step_process.OutputFile) -> ArtifactRef:
    """Persist an output that a step's process wrote (the file is moved, or read if small)."""
    materializer = materializers.by_name(output.materializer, allow_pickle=True)  # not loaded
    if materializers.in_memory(materializer):
        blob = store.put_bytes(Path(output.path).read_bytes())
    else:

        def move(path: str) -> None:
            shutil.move(output.path, path)

        blob = store.put(move)
    return ArtifactRef.of(
        blob,
        materializer=output.materializer,
        version=materializer.version,
        data_type=output.data_type,
    )


def split_outputs(definition: StepDefinition, result: Any) -> dict[str, Any]:
    """Map a step's return value onto its output names."""
    names = definition.outputs
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: result}
    if not isinstance(result, tuple) or len(result) != len(names):
        raise ConveyorError(
            f"step {definition.name!r} is annotated to return {len(names)} values "
            f"but returned {type(result).__name__}",
            retryable=False,
        )
    return dict(zip(names, result, strict=True))


class StepExecutor:
    """Executes StepReady events and answers with a StepSucceeded or StepFailed."""

    def __init__(
        self,
        store: ArtifactStore,
        resolver: StepResolver,
        facts: WorkerFacts,
        *,
        concurrency: int,
        isolation: Isolation = "thread",
    ) -> None:
        self._store = store
        self._recent = RecentBlobs()
        self._resolver = resolver
        self._facts = facts
        self._isolation: Isolation = isolation
        self._stuck_limit = concurrency
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="conveyor-io")
        self._step_threads = StepThreads()
        self._settler: Settler | None = None
        self._abandoned: set[_End] = set()
        """The ends of the sync bodies that were abandoned, set when they return."""

    @property
    def stuck_threads(self) -> int:
        """Threads of timed-out or cancelled sync steps that still run."""
        self._abandoned = {end for end in self._abandoned if not end.done}
        return len(self._abandoned)

    @property
    def healthy(self) -> bool:
        """False once as many threads are stuck as steps run at once (``concurrency``)."""
        return self.stuck_threads < self._stuck_limit

    def close(self) -> None:
        """Stop the I/O threads (queued work is dropped); idempotent."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, context.run, fn, *args)

    async def _in_own_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread that nothing else waits for (see ``step_threads``).
        Cancelled (the timeout, a run cancelled), this returns at once: the thread, which
        cannot be interrupted, is abandoned to finish in the background, and counted until
        it does."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()
        end = _End()
        settler = self._settler
        if settler is None or settler.loop is not loop:
            settler = self._settler = Settler(loop)

        def run() -> None:
            try:
                result = context.run(fn, *args)
            except BaseException as exc:
                # SystemExit and the like must not end the worker; StopIteration cannot be
                # set on a future.
                keep = isinstance(exc, Exception) and not isinstance(exc, StopIteration)
                failure = exc if keep else StepBodyFailed.of(exc)
                settler.settle(done, lambda: done.set_exception(failure))
            else:
                settler.settle(done, lambda: done.set_result(result))
            finally:
                end.done = True

        self._step_threads.run(run)
        try:
            return await done
        except asyncio.CancelledError:
            if not end.done:
                self._abandon(end)
            raise

    def _abandon(self, end: _End) -> None:
        self._abandoned.add(end)
        stuck = self.stuck_threads
        if stuck >= self._stuck_limit:
            log.error(
                "worker unhealthy: sync steps that timed out or were cancelled still run in "
                "their threads, holding memory and CPU until they return; give steps that "
                "hang @step(isolation='process'), which is killed at its timeout",
                stuck_threads=stuck,
                limit=self._stuck_limit,
            )
        else:
            log.warning(
                "sync step abandoned: its thread runs on, its result is dropped",
                stuck_threads=stuck,
            )

    def _load_inputs(self, ready: StepReady) -> dict[str, Any]:
        def load(ref: ArtifactRef) -> Any:
            return load_artifact(
                self._store,
                ref,
                allow_pickle=ready.step.allow_pickle,
                trust=ready.step.trust,
                recent=self._recent,
            )

        values: dict[str, Any] = {}
        if not ready.inputs:
            return values
        with script_classes.taken_from(self._resolver.code_at_hand(ready.step)):
            for name, refs in ready.inputs.items():
                values[name] = [load(r) for r in refs] if isinstance(refs, list) else load(refs)
        return values

    def _save_outputs(
        self, ready: StepReady, definition: StepDefinition, result: Any
    ) -> dict[str, ArtifactRef]:
        return {
            name: save_artifact(
                self._store,
                value,
                allow_pickle=ready.step.allow_pickle,
                what=f"output {name!r} of step {ready.step.name!r}",
                recent=self._recent,
                run_id=ready.run_id,
            )
            for name, value in split_outputs(definition, result).items()
        }

    def _run_sync(
        self, ready: StepReady, definition: StepDefinition
    ) -> tuple[dict[str, ArtifactRef], float]:
        kwargs = {**ready.step.parameters, **self._load_inputs(ready)}
        started = time.perf_counter()
        with self._resolver.running(ready.step):
            result = definition.fn(**kwargs)
        body = time.perf_counter() - started
        return self._save_outputs(ready, definition, result), body

    async def _run_in_process(
        self, ready: StepReady, definition: StepDefinition
    ) -> tuple[dict[str, ArtifactRef], float]:
        kwargs = {**ready.step.parameters, **await self._in_thread(self._load_inputs, ready)}

        def produce() -> dict[str, Any]:  # in the child
            return split_outputs(definition, definition.fn(**kwargs))

        folder = step_process.private_folder()
        try:
            started = time.perf_counter()
            # Entered here so that the child inherits it: it only reads what resolving found.
            with self._resolver.running(ready.step):
                child = step_process.start(
                    produce, folder, allow_pickle=ready.step.allow_pickle, step=ready.step.name
                )
            try:
                code = await child.wait()
            except BaseException:  # the timeout, or a cancellation
                await child.end()
                raise
            body = time.perf_counter() - started
            return await self._in_thread(self._store_outputs_of_child, folder, code), body
        finally:
            # Here, not in a thread, as it must happen when cancelled too: a bounded read and
            # the removal of a local folder.
            step_logs.echo(step_process.printed(folder, step_logs.MAX_LOG_CHARS))
            shutil.rmtree(folder, ignore_errors=True)

    def _store_outputs_of_child(self, folder: str, code: int) -> dict[str, ArtifactRef]:
        return {
            name: store_file(self._store, output)
            for name, output in step_process.outcome(folder, code).items()
        }

    async def _run_async(
        self, ready: StepReady, definition: StepDefinition
    ) -> tuple[dict[str, ArtifactRef], float]:
        kwargs = {**ready.step.parameters, **await self._in_thread(self._load_inputs, ready)}
        started = time.perf_counter()
        with self._resolver.running(ready.step):
            result = await definition.fn(**kwargs)
        body = time.perf_counter() - started
        return await self._in_thread(self._save_outputs, ready, definition, result), body

    async def execute(
        self, ready: StepReady, *, timeout: float | None = None
    ) -> StepSucceeded | StepFailed:
        """Run one attempt within ``timeout`` s; every exception becomes a StepFailed.

        What the attempt prints or logs is kept as a text artifact, named on the outcome.
        """
        with step_logs.capturing() as buffer:
            outcome = await self._attempt(ready, timeout)
        text = step_logs.text_of(buffer)
        if not text:
            return outcome
        try:
            logs = await self._in_thread(self._save_logs, text)
        except OSError as exc:
            log.warning("step logs not kept", step=ready.step.name, error=str(exc))
            return outcome
        return outcome.model_copy(update={"logs": logs})

    def _save_logs(self, text: str) -> ArtifactRef:
        blob = self._store.put_bytes(text.encode())
        return ArtifactRef.of(blob, materializer="str", version="1", data_type="builtins.str")

    async def _attempt(self, ready: StepReady, limit: float | None) -> StepSucceeded | StepFailed:
        started = time.perf_counter()
        # No timer at all without a limit (most steps): a Timeout costs a step 1-2%.
        deadline = None if limit is None else asyncio.timeout(limit)
        try:
            # Resolving may download a code archive and imports user code: off the loop,
            # unless it was done before.
            definition = self._resolver.resolved(ready.step)
            if definition is None:
                definition = await self._in_thread(self._resolver.resolve, ready.step)
            async with deadline or contextlib.nullcontext():
                if definition.is_async:
                    outputs, body = await self._run_async(ready, definition)
                elif (ready.step.isolation or self._isolation) == "process":
                    outputs, body = await self._run_in_process(ready, definition)
                else:
                    outputs, body = await self._in_own_thread(self._run_sync, ready, definition)
        except StepBodyFailed as exc:
            return self._failed(
                ready, exc.error, exc.traceback, exc.retryable, started, exc.retry_after_s
            )
        except TimeoutError as exc:
            if deadline is None or not deadline.expired():  # the step raised TimeoutError
                return self._failed(ready, error_line(exc), user_traceback(exc), True, started)
            return self._failed(
                ready, f"TimeoutError: step timed out after {limit}s", None, True, started
            )
        except UntrustedStep:
            raise  # not a step failure: the worker refuses the message itself
        except ConveyorError as exc:
            after = retry_after(exc)
            return self._failed(
                ready, error_line(exc), user_traceback(exc), exc.retryable, started, after
            )
        except Exception as exc:
            return self._failed(ready, error_line(exc), user_traceback(exc), True, started)
        # Of a validated StepReady and the refs this worker stored: not validated again (a
        # controller that takes it from a broker parses it).
        return trusted(
            StepSucceeded,
            run_id=ready.run_id,
            step=ready.step.name,
            attempt=ready.attempt,
            outputs=outputs,
            duration_s=body,
            by=self._facts,
            rode_on=ready.rode_on,
        )

    def refused(self, ready: StepReady, reason: UntrustedStep) -> StepFailed:
        """The outcome of a StepReady this worker will not run: failed, not to be retried."""
        return self.failed(ready, f"refused: {reason}")

    def failed(self, ready: StepReady, error: str) -> StepFailed:
        """The outcome of an attempt that was not run, for ``error``: not to be retried."""
        return self._failed(ready, error, None, False, time.perf_counter())

    def _shown(self, text: str) -> str:
        """``text`` as the user names things: modules loaded by path as their files, and
        the files of a run's code archive as they are in the user's project."""
        return self._resolver.shown(readable(text))

    def _failed(
        self,
        ready: StepReady,
        error: str,
        tb: str | None,
        retryable: bool,
        started: float,
        retry_after_s: float | None = None,
    ) -> StepFailed:
        return StepFailed(
            run_id=ready.run_id,
            step=ready.step.name,
            attempt=ready.attempt,
            # Bounded here, after the names are made readable: a step's process reports its
            # texts through a file, and a readable name may be longer than the generated one.
            error=keep_head(self._shown(error), MAX_STEP_ERROR_LENGTH),
            traceback=None if tb is None else keep_tail(self._shown(tb), MAX_TRACEBACK_LENGTH),
            retryable=retryable,
            retry_after_s=retry_after_s,
            duration_s=time.perf_counter() - started,
            by=self._facts,
            rode_on=ready.rode_on,
        )


class _End:
    """Whether a sync body's thread returned: set by that thread, read on the loop (a
    ``threading.Event``, with its lock and condition, cost a step more and nobody waits
    on it)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False
