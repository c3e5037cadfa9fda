"""What ``pipeline run`` shows while it follows a run: lines, and a live bar in a terminal."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime

from rich.console import Console

from conveyor.contracts import StepStatus, StepStatusChanged
from conveyor.service.cli.run_progress import RunFollower, StepTally, step_line


def change(step: str, status: StepStatus, **fields: object) -> StepStatusChanged:
    return StepStatusChanged(run_id="r" * 32, step=step, status=status, attempt=1, **fields)  # type: ignore[arg-type]


def test_the_tally_counts_each_steps_latest_status() -> None:
    tally = StepTally(total=4)
    for event in [
        change("a", StepStatus.RUNNING),
        change("b", StepStatus.RUNNING),
        change("a", StepStatus.COMPLETED),
        change("b", StepStatus.FAILED),
        change("c", StepStatus.SKIPPED),
        change("d", StepStatus.RUNNING),
    ]:
        tally.apply(event)
    assert (tally.done, tally.running, tally.failed) == (3, 1, 1)


def test_a_line_per_change_with_markup_in_names_and_errors_kept_as_text() -> None:
    assert step_line(change("a", StepStatus.RUNNING)) is None
    failed = step_line(change("a[x]", StepStatus.FAILED, error="KeyError: [red]", duration_s=2))
    out = Console(file=io.StringIO(), width=200)
    out.print(failed)
    assert out.file.getvalue() == "  failed    a[x] in 2.00s: KeyError: [red]\n"  # type: ignore[attr-defined]


def test_a_retry_that_waits_says_when_it_is_due() -> None:
    due = datetime(2026, 1, 1, 12, 0, 4, tzinfo=UTC)
    waits = change("a", StepStatus.PENDING, error="ConnectionError: down", retry_at=due)
    assert step_line(waits) == "  ↻ a retrying (attempt 1) at 12:00:04 UTC: ConnectionError: down"
    at_once = change("a", StepStatus.PENDING, error="ConnectionError: down")
    assert step_line(at_once) == "  ↻ a retrying (attempt 1): ConnectionError: down"


async def follow(terminal: bool) -> str:
    file = io.StringIO()
    console = Console(file=file, force_terminal=terminal, color_system=None, width=120)
    async with RunFollower(console, "training", 3, bar_after=0.05) as follower:
        follower.on_step(change("load", StepStatus.RUNNING))
        follower.on_step(change("load", StepStatus.COMPLETED, duration_s=0.1))
        follower.on_step(change("fit", StepStatus.RUNNING))
        await asyncio.sleep(0.3)  # the run goes on: the bar shows
        follower.on_step(change("fit", StepStatus.FAILED, error="boom"))
        await asyncio.sleep(0.2)
    return file.getvalue()


async def test_a_terminal_gets_a_live_bar_of_steps_done_running_and_failed() -> None:
    shown = await follow(terminal=True)
    assert "training" in shown
    assert "1/3 steps · 1 running · 0 failed" in shown
    assert "2/3 steps · 0 running · 1 failed" in shown
    assert "completed load" in shown and "failed    fit" in shown


async def test_piped_output_keeps_one_line_per_change_and_no_bar() -> None:
    shown = await follow(terminal=False)
    assert shown.splitlines() == ["  completed load in 100ms", "  failed    fit: boom"]


async def test_a_quick_run_shows_no_bar() -> None:
    file = io.StringIO()
    console = Console(file=file, force_terminal=True, width=120)
    async with RunFollower(console, "quick", 1, bar_after=5) as follower:
        follower.on_step(change("only", StepStatus.COMPLETED, duration_s=0.01))
    assert "steps ·" not in file.getvalue()
