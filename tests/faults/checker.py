"""What a fault campaign must show, computed from plain data (no I/O here).

Inputs: the runs the submitter had confirmed by the broker, the runs as the metadata store
recorded them (with each completed step's output mark, see ``ledger_pipelines.py``), the
ledger of executions, the dead letters, and ``PRAGMA integrity_check``'s rows.

Counts:

- submitted: RunRequested messages the broker confirmed.
- completed / failed with a reason / failed without one / cancelled: final run records.
- lost: submitted, yet the store has no record of the run at the deadline.
- stuck: recorded, yet still pending or running at the deadline.
- re-executions: ledger lines beyond the first for a (run, step). Delivery is at least once,
  so a step whose worker was killed, frozen or cut off may run again; that is allowed and
  reported, not an error.
- effects applied twice: what must not happen under at-least-once delivery. A run's
  recorded result must come from exactly one execution of each step: the recorded output's
  mark names an execution the ledger holds, of the attempt the store recorded, and every
  downstream step consumed the very executions recorded for its upstream steps (in this
  DAG every upstream step is an input). A recorded output from an unknown execution or a
  stale attempt, a step that consumed another execution's output than the one recorded,
  or a second artifact record for one output, each counts once per step.
- dead letters: explained when the run they belong to ended failed with a reason (the
  failure was reported: nothing silent); any other dead letter is a problem.
- integrity: the rows of ``PRAGMA integrity_check`` other than ``ok``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FINISHED = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class Execution:
    """One ledger line: a step body started."""

    run_id: str
    step: str
    attempt: int
    nonce: str
    pid: int


@dataclass(frozen=True)
class StepOutcome:
    """A step as the store recorded it; ``mark`` is its output's value, if it has one."""

    name: str
    status: str
    attempt: int
    upstream: tuple[str, ...] = ()
    mark: Mapping[str, Any] | None = None
    artifacts: int = 0  # artifact records of this step
    outputs: int = 1  # outputs the step declares


@dataclass(frozen=True)
class RunOutcome:
    """A run as the store recorded it."""

    run_id: str
    status: str
    error: str | None = None
    steps: tuple[StepOutcome, ...] = ()


@dataclass(frozen=True)
class DeadLetter:
    """A message of the dead-letter queue: its event type, run, step and reason."""

    type: str
    run_id: str | None
    step: str | None
    reason: str


@dataclass(frozen=True)
class Violation:
    run_id: str
    step: str
    what: str


@dataclass
class Verdict:
    submitted: int = 0
    completed: int = 0
    failed_with_reason: int = 0
    failed_without_reason: int = 0
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # recorded, never submitted
    executions: int = 0
    re_executions: int = 0
    applied_twice: list[Violation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    unexplained_dead_letters: list[DeadLetter] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # run errors by text

    def problems(self) -> list[str]:
        """Everything that must be zero, said in words; empty when the campaign passed."""
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} lost: {self.lost[:5]}")
        if self.stuck:
            found.append(f"{len(self.stuck)} stuck: {self.stuck[:5]}")
        if self.unexpected:
            found.append(f"{len(self.unexpected)} recorded but never submitted")
        if self.failed_without_reason:
            found.append(f"{self.failed_without_reason} failed without a reason")
        if self.applied_twice:
            found.append(f"{len(self.applied_twice)} applied twice: {self.applied_twice[:5]}")
        if self.unexplained_dead_letters:
            found.append(
                f"{len(self.unexplained_dead_letters)} unexplained dead letters: "
                f"{self.unexplained_dead_letters[:5]}"
            )
        if self.integrity:
            found.append(f"integrity_check: {self.integrity[:5]}")
        return found

    def counts(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "completed": self.completed,
            "failed_with_reason": self.failed_with_reason,
            "failed_without_reason": self.failed_without_reason,
            "cancelled": self.cancelled,
            "lost": len(self.lost),
            "stuck": len(self.stuck),
            "executions": self.executions,
            "re_executions": self.re_executions,
            "applied_twice": len(self.applied_twice),
            "dead_letters": len(self.dead_letters),
            "unexplained_dead_letters": len(self.unexplained_dead_letters),
            "integrity_problems": len(self.integrity),
        }


def parse_ledger(text: str) -> list[Execution]:
    """The ledger's lines; a torn last line (a worker killed mid-write) is skipped."""
    executions = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 5 or not fields[2].isdigit() or not fields[4].isdigit():
            continue
        run_id, step, attempt, nonce, pid = fields
        executions.append(Execution(run_id, step, int(attempt), nonce, int(pid)))
    return executions


def re_executions(executions: Iterable[Execution]) -> int:
    """Ledger lines beyond the first of each (run, step)."""
    per_step = Counter((e.run_id, e.step) for e in executions)
    return sum(n - 1 for n in per_step.values())


def applied_twice(run: RunOutcome, executions: Sequence[Execution]) -> list[Violation]:
    """The steps of ``run`` whose recorded result is not the effect of exactly one execution."""
    known = {e.nonce: e for e in executions if e.run_id == run.run_id}
    recorded = {
        s.name: str(s.mark["nonce"]) for s in run.steps if s.mark is not None and "nonce" in s.mark
    }
    found = []
    for step in run.steps:
        if step.status != "completed":
            continue
        whats = _step_violations(run.run_id, step, known, recorded)
        if whats:
            found.append(Violation(run.run_id, step.name, "; ".join(whats)))
    return found


def _step_violations(
    run_id: str, step: StepOutcome, known: Mapping[str, Execution], recorded: Mapping[str, str]
) -> list[str]:
    mark = step.mark
    if mark is None:
        return ["completed without a readable output"]
    found = []
    if mark.get("run") != run_id or mark.get("step") != step.name:
        found.append(f"recorded output is {mark.get('run')}/{mark.get('step')}'s")
    execution = known.get(str(mark.get("nonce")))
    if execution is None or execution.step != step.name:
        found.append("recorded output comes from an execution the ledger does not hold")
    if mark.get("attempt") != step.attempt:
        found.append(f"recorded output of attempt {mark.get('attempt')}, step at {step.attempt}")
    consumed = sorted(str(n) for n in mark.get("inputs", []))
    expected = sorted(recorded.get(name, "?") for name in step.upstream)
    if consumed != expected:
        found.append("consumed another execution's output than the one recorded upstream")
    if step.artifacts > step.outputs:
        found.append(f"{step.artifacts} artifact records for {step.outputs} output(s)")
    return found


def check(
    submitted: Iterable[str],
    runs: Iterable[RunOutcome],
    executions: Sequence[Execution],
    dead_letters: Sequence[DeadLetter],
    integrity: Sequence[str],
) -> Verdict:
    """Count and judge a campaign; see the module's docstring for each count."""
    wanted = list(dict.fromkeys(submitted))
    by_id = {run.run_id: run for run in runs}
    verdict = Verdict(submitted=len(wanted), executions=len(executions))
    verdict.lost = [run_id for run_id in wanted if run_id not in by_id]
    verdict.unexpected = sorted(set(by_id) - set(wanted))
    failed_with_reason: set[str] = set()
    for run in by_id.values():
        if run.status not in FINISHED:
            verdict.stuck.append(run.run_id)
        elif run.status == "completed":
            verdict.completed += 1
        elif run.status == "cancelled":
            verdict.cancelled += 1
        elif run.error:
            verdict.failed_with_reason += 1
            verdict.failures[run.error] += 1
            failed_with_reason.add(run.run_id)
        else:
            verdict.failed_without_reason += 1
        verdict.applied_twice.extend(applied_twice(run, executions))
    verdict.re_executions = re_executions(executions)
    verdict.dead_letters = list(dead_letters)
    verdict.unexplained_dead_letters = [
        letter for letter in dead_letters if letter.run_id not in failed_with_reason
    ]
    verdict.integrity = [row for row in integrity if row != "ok"]
    if not integrity:
        verdict.integrity = ["integrity_check returned nothing"]
    return verdict


# --- recovery ---------------------------------------------------------------------------


def latencies(submitted: Mapping[str, float], finished: Mapping[str, float]) -> list[float]:
    """Seconds from each run's submission to its end, for the runs that ended."""
    return sorted(finished[r] - t for r, t in submitted.items() if r in finished)


@dataclass(frozen=True)
class FaultWindow:
    """A fault as the nemesis applied it: wall-clock seconds (time.time())."""

    kind: str
    started: float
    lifted: float  # when the nemesis undid it (resumed, continued, restarted)


@dataclass(frozen=True)
class Recovery:
    kind: str
    at_s: float  # since the campaign started
    held_s: float
    to_next_step_s: float | None  # from the fault's start to the first step completed after
    to_next_run_s: float | None  # ... and to the first run completed after it was lifted


def recovery_times(
    faults: Sequence[FaultWindow],
    step_completions: Iterable[float],
    run_completions: Iterable[float],
    origin: float,
) -> list[Recovery]:
    """For each fault, how long until the stack completed a step, and a run, again."""
    steps = sorted(step_completions)
    runs = sorted(run_completions)

    def first_after(times: list[float], moment: float) -> float | None:
        return next((t for t in times if t > moment), None)

    found = []
    for fault in faults:
        step = first_after(steps, fault.lifted)
        run = first_after(runs, fault.lifted)
        found.append(
            Recovery(
                kind=fault.kind,
                at_s=fault.started - origin,
                held_s=fault.lifted - fault.started,
                to_next_step_s=None if step is None else step - fault.started,
                to_next_run_s=None if run is None else run - fault.started,
            )
        )
    return found
