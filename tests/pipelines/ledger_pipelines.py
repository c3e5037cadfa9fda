"""A small DAG for the fault suite whose steps leave a ledger of what they executed.

Every execution of a step appends one line ``RUN_ID STEP ATTEMPT NONCE PID`` to the file
named by ``$CONVEYOR_TEST_LEDGER`` before it does its bit of work, and returns a mark
``{"run", "step", "attempt", "nonce", "inputs"}``: ``nonce`` is new for each execution and
``inputs`` holds the nonces of the marks it consumed. The ledger therefore counts every
execution (re-executions included), and a run's recorded outputs say which execution each
came from and which executions downstream steps consumed; ``tests/faults/checker.py``
compares the two.

The worker binds the run id, step name and attempt into structlog's context around each
attempt (and copies that context into the thread a sync step runs in): that is how a step
learns them here, without a parameter of its own.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import structlog

from conveyor import pipeline, step

LEDGER_ENV = "CONVEYOR_TEST_LEDGER"
PIPELINE = "tests/pipelines/ledger_pipelines.py:ledger_dag"

Mark = dict[str, Any]


def _execute(inputs: list[Mark], work_s: float) -> Mark:
    bound = structlog.contextvars.get_contextvars()
    run_id, name, attempt = bound["run_id"], bound["step"], int(bound["attempt"])
    nonce = uuid.uuid4().hex[:16]
    line = f"{run_id} {name} {attempt} {nonce} {os.getpid()}\n".encode()
    # One write(2) with O_APPEND: lines of concurrent workers do not interleave.
    fd = os.open(os.environ[LEDGER_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    time.sleep(work_s)
    return {
        "run": run_id,
        "step": name,
        "attempt": attempt,
        "nonce": nonce,
        "inputs": [mark["nonce"] for mark in inputs],
    }


@step
def source(work_s: float = 0.2) -> Mark:
    return _execute([], work_s)


@step
def branch(upstream: Mark, index: int = 0, work_s: float = 0.2) -> Mark:
    return _execute([upstream], work_s)


@step
def join(parts: list[Mark], work_s: float = 0.2) -> Mark:
    return _execute(parts, work_s)


@step
def report(joined: Mark, work_s: float = 0.2) -> Mark:
    return _execute([joined], work_s)


@pipeline
def ledger_dag(width: int = 3, work_s: float = 0.2) -> None:
    """source, ``width`` branches (a fan-out), a join (the fan-in), then report."""
    root = source(work_s=work_s)
    report(join([branch(root, index=i, work_s=work_s) for i in range(width)], work_s=work_s))
