"""What ``conveyor pipeline run`` shows while it follows a run: a line per step change and,
in a terminal, a live bar of the steps done, running and failed.

Piped output (a script, a CI log) keeps one line per change and no bar: a bar redrawn in a
file is noise. The bar appears only once the run has taken a second, so a quick run prints
exactly what it printed before.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from conveyor.contracts import FINISHED_STEP_STATUSES, StepStatus, StepStatusChanged
from conveyor.service.cli.output import seconds

BAR_AFTER_S = 1.0
"""How long a run goes before its live bar appears."""

STATUS_STYLE = {
    StepStatus.COMPLETED: "green",
    StepStatus.CACHED: "green",
    StepStatus.FAILED: "red",
    StepStatus.SKIPPED: "yellow",
    StepStatus.CANCELLED: "yellow",
    StepStatus.RUNNING: "cyan",
    StepStatus.PENDING: "white",
}


@dataclass
class StepTally:
    """The latest status of each step of a run, counted for the bar."""

    total: int
    statuses: dict[str, StepStatus] = field(default_factory=dict)

    def apply(self, event: StepStatusChanged) -> None:
        self.statuses[event.step] = event.status

    def count(self, *statuses: StepStatus) -> int:
        return sum(1 for status in self.statuses.values() if status in statuses)

    @property
    def done(self) -> int:
        return self.count(*FINISHED_STEP_STATUSES)

    @property
    def running(self) -> int:
        return self.count(StepStatus.RUNNING)

    @property
    def failed(self) -> int:
        return self.count(StepStatus.FAILED)


def announce_run(
    console: Console, pipeline: str, stack: str, run_id: str, retry_of: str | None
) -> None:
    """The line that names a started run, never wrapped: scripts read the id from it."""
    retrying = f", retrying run {retry_of}" if retry_of else ""
    console.print(
        f"Running pipeline [bold]{escape(pipeline)}[/bold] on stack '{escape(stack)}' as run "
        f"[bold]{run_id}[/bold]{retrying}",
        soft_wrap=True,
    )


def step_line(event: StepStatusChanged) -> str | None:
    """The line (rich markup) that reports a step change; None for a step that started."""
    if event.status is StepStatus.RUNNING:
        return None
    if event.status is StepStatus.PENDING:
        retry = f"retrying (attempt {event.attempt})"
        if event.retry_at is not None:
            retry += f" at {event.retry_at:%H:%M:%S} UTC"
        return f"  ↻ {escape(event.step)} {retry}: {escape(event.error or '')}"
    style = STATUS_STYLE.get(event.status, "white")
    line = f"  [{style}]{event.status.value:<9}[/{style}] {escape(event.step)}"
    if event.status is StepStatus.CACHED:
        return line + (f" from run {event.cached_from}" if event.cached_from else "")
    if event.duration_s is not None:
        line += f" in {seconds(event.duration_s)}"
    if event.status is StepStatus.FAILED and event.error:
        line += f": {escape(event.error)}"
    return line


class RunFollower:
    """Prints a run's step changes on ``console``; on a terminal, a live bar too.

    Lifecycle: ``async with``; ``on_step`` is the run's step callback.
    """

    def __init__(
        self, console: Console, pipeline: str, steps: int, *, bar_after: float = BAR_AFTER_S
    ) -> None:
        self._console = console
        self._pipeline = pipeline
        self._bar_after = bar_after
        self.tally = StepTally(steps)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._timer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunFollower:
        if self._console.is_terminal:
            self._timer = asyncio.create_task(self._show_bar_later(), name="progress-bar")
        return self

    async def __aexit__(self, *exc: object) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

    async def _show_bar_later(self) -> None:
        await asyncio.sleep(self._bar_after)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps · {task.fields[running]} running · {task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
        )
        self._task = self._progress.add_task(
            escape(self._pipeline), total=self.tally.total, running=0, failed=0
        )
        self._refresh()
        self._progress.start()

    def _refresh(self) -> None:
        if self._progress is not None and self._task is not None:
            tally = self.tally
            self._progress.update(
                self._task, completed=tally.done, running=tally.running, failed=tally.failed
            )

    def on_step(self, event: StepStatusChanged) -> None:
        """Count the change, print its line (above the bar, if there is one)."""
        self.tally.apply(event)
        line = step_line(event)
        if line is not None:
            self._console.print(line, soft_wrap=True)
        self._refresh()
