"""Running one attempt of a step: load inputs, call the body, persist outputs.

Blocking work (file I/O, hashing, sync step bodies) runs in a thread pool with the
caller's context copied, so log bindings survive and the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from conveyor.contracts import (
    ArtifactRef,
    ArtifactStore,
    ConveyorError,
    StepFailed,
    StepReady,
    StepSucceeded,
    UntrustedStep,
    WorkerFacts,
)
from conveyor.workers import materializers, step_logs
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import StepDefinition

T = TypeVar("T")
log = structlog.get_logger("conveyor.worker")


SMALL = 1 << 20
"""Values up to this size, when their materializer keeps them in memory, are read at once."""


def load_artifact(store: ArtifactStore, ref: ArtifactRef, *, allow_pickle: bool) -> Any:
    """The value of a persisted artifact, verified against its digest."""
    materializer = materializers.by_name(ref.materializer, allow_pickle=allow_pickle)
    if isinstance(materializer, materializers.InMemory) and ref.size <= SMALL:
        return materializer.parse(store.get_bytes(ref.uri, ref.digest), ref)
    return store.get(ref.uri, ref.digest, lambda path: materializer.load(path, ref))


def save_artifact(
    store: ArtifactStore, value: object, *, allow_pickle: bool, what: str
) -> ArtifactRef:
    """Persist ``value``; ``what`` names it in the error if no materializer fits."""
    materializer = materializers.choose(value, allow_pickle=allow_pickle, what=what)
    if isinstance(materializer, materializers.InMemory):
        # A small value is bytes already: hashed first, it is not written at all when its
        # content address is taken (a re-executed step, a value many runs produce).
        blob = store.put_bytes(materializer.dump(value))
    else:
        blob = store.put(lambda path: materializer.save(value, path))
    return ArtifactRef.of(
        blob, materializer=materializer.name, data_type=materializers.type_name(value)
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


class _ThreadTimeout(Exception):
    """A sync step raised TimeoutError; carries its error and traceback as text."""

    def __init__(self, error: str, traceback_text: str) -> None:
        super().__init__(error)
        self.error = error
        self.traceback = traceback_text


class StepExecutor:
    """Executes StepReady events and answers with a StepSucceeded or StepFailed."""

    def __init__(
        self,
        store: ArtifactStore,
        resolver: StepResolver,
        facts: WorkerFacts,
        threads: ThreadPoolExecutor,
    ) -> None:
        self._store = store
        self._resolver = resolver
        self._facts = facts
        self._threads = threads

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, context.run, fn, *args)

    def _load_inputs(self, ready: StepReady) -> dict[str, Any]:
        pickle_ok = ready.step.allow_pickle
        values: dict[str, Any] = {}
        for name, refs in ready.inputs.items():
            if isinstance(refs, list):
                values[name] = [load_artifact(self._store, r, allow_pickle=pickle_ok) for r in refs]
            else:
                values[name] = load_artifact(self._store, refs, allow_pickle=pickle_ok)
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
            )
            for name, value in split_outputs(definition, result).items()
        }

    def _run_sync(
        self, ready: StepReady, definition: StepDefinition
    ) -> tuple[dict[str, ArtifactRef], float]:
        kwargs = {**ready.step.parameters, **self._load_inputs(ready)}
        started = time.perf_counter()
        try:
            with self._resolver.running(ready.step):
                result = definition.fn(**kwargs)
        except TimeoutError as exc:
            # asyncio re-creates a TimeoutError that crosses from a thread, without its
            # traceback: keep the step's own traceback as text.
            raise _ThreadTimeout(f"TimeoutError: {exc}", traceback.format_exc()) from None
        body = time.perf_counter() - started
        return self._save_outputs(ready, definition, result), body

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
        return ArtifactRef.of(blob, materializer="str", data_type="builtins.str")

    async def _attempt(self, ready: StepReady, limit: float | None) -> StepSucceeded | StepFailed:
        started = time.perf_counter()
        deadline = asyncio.timeout(limit)
        try:
            # Resolving may download a code archive and imports user code: off the loop,
            # unless it was done before.
            definition = self._resolver.resolved(ready.step)
            if definition is None:
                definition = await self._in_thread(self._resolver.resolve, ready.step)
            async with deadline:
                if definition.is_async:
                    outputs, body = await self._run_async(ready, definition)
                else:
                    outputs, body = await self._in_thread(self._run_sync, ready, definition)
        except _ThreadTimeout as exc:
            return self._failed(ready, exc.error, exc.traceback, True, started)
        except TimeoutError as exc:
            if not deadline.expired():  # the step itself raised TimeoutError
                return self._failed(
                    ready, f"TimeoutError: {exc}", traceback.format_exc(), True, started
                )
            return self._failed(
                ready, f"TimeoutError: step timed out after {limit}s", None, True, started
            )
        except UntrustedStep:
            raise  # not a step failure: the worker refuses the message itself
        except ConveyorError as exc:
            return self._failed(ready, f"{type(exc).__name__}: {exc}", None, exc.retryable, started)
        except Exception as exc:
            return self._failed(
                ready, f"{type(exc).__name__}: {exc}", traceback.format_exc(), True, started
            )
        return StepSucceeded(
            run_id=ready.run_id,
            step=ready.step.name,
            attempt=ready.attempt,
            outputs=outputs,
            duration_s=body,
            by=self._facts,
        )

    def refused(self, ready: StepReady, reason: UntrustedStep) -> StepFailed:
        """The outcome of a StepReady this worker will not run: failed, not to be retried."""
        return self.failed(ready, f"refused: {reason}")

    def failed(self, ready: StepReady, error: str) -> StepFailed:
        """The outcome of an attempt that was not run, for ``error``: not to be retried."""
        return self._failed(ready, error, None, False, time.perf_counter())

    def _failed(
        self, ready: StepReady, error: str, tb: str | None, retryable: bool, started: float
    ) -> StepFailed:
        return StepFailed(
            run_id=ready.run_id,
            step=ready.step.name,
            attempt=ready.attempt,
            error=error,
            traceback=tb,
            retryable=retryable,
            duration_s=time.perf_counter() - started,
            by=self._facts,
        )
