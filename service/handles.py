"""The synchronous face of a finished run, returned by calling a pipeline (or carried by
the ``RunFailed`` it raises)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conveyor.contracts import (
    ConveyorError,
    RunRecord,
    RunStatus,
    StepRecord,
    StepStatus,
)
from conveyor.service.blocking import run_to_end
from conveyor.service.failures import failure_of
from conveyor.workers.execution import load_artifact
from conveyor.workers.flavors import run_artifact_store

if TYPE_CHECKING:
    from conveyor.service.pipelines import PipelineDefinition


class RunHandle:
    """A run with its steps, as recorded when it finished."""

    def __init__(self, record: RunRecord, steps: list[StepRecord]) -> None:
        self.record = record
        self.steps = {s.name: s for s in steps}

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> RunStatus:
        return self.record.status

    @property
    def step_statuses(self) -> dict[str, StepStatus]:
        return {name: s.status for name, s in self.steps.items()}

    def load(
        self,
        step: str,
        output: str = "output",
        *,
        allow_pickle: bool = False,
        trust: Sequence[str] = (),
    ) -> Any:
        """The value of an output, read back from the run's artifact store; ``trust`` names
        types a skops file may build beyond those skops trusts."""
        record = self.steps.get(step)
        if record is None or output not in record.outputs:
            raise ConveyorError(f"run {self.id} has no output {output!r} of step {step!r}")
        return self._load(record, output, allow_pickle=allow_pickle, trust=trust)

    def _load(
        self, record: StepRecord, output: str, *, allow_pickle: bool, trust: Sequence[str]
    ) -> Any:
        """Output ``output`` of the step ``record``, which has it."""
        store = run_artifact_store(self.record.stack_snapshot)
        return load_artifact(store, record.outputs[output], allow_pickle=allow_pickle, trust=trust)

    def __repr__(self) -> str:
        return f"<run {self.id} {self.record.pipeline} {self.status.value}>"


def _tell(text: str) -> None:
    """What a run waits for, told to the person who called the pipeline (a script's or a
    notebook's stderr): the logs may be configured to show nothing."""
    print(f"conveyor: {text}", file=sys.stderr, flush=True)


def run_pipeline(
    definition: PipelineDefinition,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    raise_on_failure: bool = True,
    stack: str | None = None,
    retry_of: str | None = None,
) -> RunHandle:
    """Run ``definition`` on the active stack (or ``stack``) and wait for the end; raise
    ``RunFailed`` if the run did not complete, unless ``raise_on_failure`` is false. With
    ``retry_of``, the run retries that one (see ``Client.retry_run``).

    Works where an event loop already runs in this thread (Jupyter, IPython): the run then
    has a loop of its own in another thread. Ctrl+C (an interrupted kernel) cancels the run.
    """
    from conveyor.service.engine import Conveyor
    from conveyor.service.home import Home
    from conveyor.service.login import read_login

    if read_login(Home.resolve()) is not None:
        # A logged-in home runs on the server: compiled here, followed through its API.
        from conveyor.service.remote_runs import run_remote

        remote = run_remote(definition, args, kwargs, stack=stack, retry_of=retry_of, say=_tell)
        failure = failure_of(remote.record, list(remote.steps.values()), remote)
        if failure is not None and raise_on_failure:
            raise failure
        return remote

    async def main() -> RunHandle:
        async with Conveyor(stack=stack) as cv:
            spec, definitions = definition.compile(*args, **kwargs)
            run = await cv.submit_compiled(spec, definitions, retry_of=retry_of)
            try:
                record = await run.wait(on_waiting=_tell)
            except asyncio.CancelledError:
                _tell(f"interrupted: cancelling run {run.id}")
                await run.interrupt("interrupted (Ctrl+C in the calling Python)", _tell)
                raise
            return RunHandle(record, await run.steps())

    handle = run_to_end(main)
    failure = failure_of(handle.record, list(handle.steps.values()), handle)
    if failure is not None and raise_on_failure:
        raise failure
    return handle
