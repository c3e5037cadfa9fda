"""``conveyor pipeline run`` and ``conveyor run retry`` on a home logged in to a server.

The pipeline is compiled here, its code uploaded and the run submitted through the server
(``service.remote_runs``); the command then follows it over server-sent events and prints
what a run on a local store prints: a line per step change, the outputs of the last steps,
the outcome. Ctrl+C cancels the run on the server.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from conveyor.contracts import ConveyorError, RunRecord, StepRecord, StepStatus, StepStatusChanged
from conveyor.service.cli.output import say, status
from conveyor.service.cli.run_progress import RunFollower, announce_run
from conveyor.service.remote_client import RemoteClient
from conveyor.service.remote_runs import follow_or_cancel, leaf_outputs, submit

if TYPE_CHECKING:
    from conveyor.service.pipelines import PipelineDefinition


# A local run's steps print to this console as they go; a server's steps print into its logs,
# which are shown here once each step is done, so the console tells the same.
_ECHOED = frozenset({StepStatus.COMPLETED, StepStatus.FAILED})


def _echo_output(client: RemoteClient, run_id: str, step: str) -> None:
    try:
        text = client.get_logs(run_id, step).get(step, "")
    except ConveyorError:
        return  # the outcome still shows: a missing log is not the run's failure
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def run_on_server(
    definition: PipelineDefinition,
    stack: str | None,
    params: dict[str, Any],
    *,
    cache: bool = True,
    retry_of: str | None = None,
) -> tuple[RunRecord, list[StepRecord], dict[str, Any]]:
    """Run ``definition`` on the server this home is logged in to and follow it; the run,
    its steps and the outputs of its last steps."""
    spec, definitions = definition.compile(**params)
    with RemoteClient() as client:
        run = submit(client, spec, definitions, stack=stack, cache=cache, retry_of=retry_of)
        announce_run(status(), definition.name, run.stack_name, run.id, retry_of)

        async def main() -> RunRecord:
            why = "interrupted (Ctrl+C on conveyor pipeline run)"
            changes: asyncio.Queue[StepStatusChanged | None] = asyncio.Queue()
            async with RunFollower(status(), definition.name, len(spec.steps)) as follower:

                async def show() -> None:
                    # Each finished step's log is fetched off the loop, so the stream is
                    # read on meanwhile; changes show in the order they came, a step's log
                    # before its line.
                    while (change := await changes.get()) is not None:
                        if change.status in _ECHOED:
                            await asyncio.to_thread(_echo_output, client, run.id, change.step)
                        follower.on_step(change)

                shown = asyncio.create_task(show())
                try:
                    record = await follow_or_cancel(client, run.id, changes.put_nowait, say, why)
                except BaseException:
                    shown.cancel()
                    raise
                changes.put_nowait(None)
                await shown
                return record

        record = asyncio.run(main())
        steps = client.get_steps(record.id)
        return record, steps, leaf_outputs(client, record.id, steps)
