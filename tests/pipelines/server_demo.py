"""Pipelines for the server and dashboard tests: slow enough that a page sees steps move.

``gated_pipeline`` holds at its ``wait_for_gate`` step until the file ``gate`` exists, so a
test decides when the run may go on, and can look at it while it is running.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from conveyor import pipeline, step

STEP_PAUSE_S = 0.3


@step
def prepare(n: int = 5) -> dict[str, list[int]]:
    time.sleep(STEP_PAUSE_S)
    return {"values": list(range(n))}


@step
def wait_for_gate(
    data: dict[str, list[int]], gate: str = "", timeout_s: float = 30.0
) -> dict[str, list[int]]:
    """Go on once the file ``gate`` exists (at once without a gate)."""
    deadline = time.monotonic() + timeout_s
    while gate and not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody opened the gate {gate} within {timeout_s}s")
        time.sleep(0.05)
    return data


@step
def to_array(data: dict[str, list[int]]) -> np.ndarray:
    time.sleep(STEP_PAUSE_S)
    return np.array(data["values"], dtype=np.float64)


@step
def describe(data: dict[str, list[int]]) -> str:
    time.sleep(STEP_PAUSE_S)
    return f"{len(data['values'])} values"


@step
def summarize(array: np.ndarray, text: str) -> dict[str, float | str]:
    return {"mean": float(array.mean()), "text": text}


@pipeline
def gated_pipeline(n: int = 5, gate: str = "", timeout_s: float = 30.0) -> None:
    data = wait_for_gate(prepare(n=n), gate=gate, timeout_s=timeout_s)
    summarize(to_array(data), describe(data))


@step
def one(i: int) -> int:
    return i


@pipeline
def fan_out_pipeline(width: int = 3, started: str = "", gate: str = "") -> None:
    """``width`` parallel steps; with ``started`` and ``gate``, compiling it first marks the
    file ``started`` and then holds until the file ``gate`` exists (a test's window onto a
    compilation in progress)."""
    if started:
        Path(started).touch()
        deadline = time.monotonic() + 30
        while not Path(gate).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"nobody opened the gate {gate}")
            time.sleep(0.02)
    for i in range(width):
        one(i)


HOSTILE_STEP = "<script>window.pwned = 'step'</script>"
HOSTILE_LOG = "<script>window.pwned = 'log'</script> printed by the step"
HOSTILE_ERROR = "<img src=x onerror=\"window.pwned = 'error'\">"


@step(name=HOSTILE_STEP, retries=1)
def hostile(data: dict[str, list[int]]) -> int:
    """Logs and raises markup, on both of its attempts (its name is markup too)."""
    logging.getLogger("hostile").warning(HOSTILE_LOG)
    raise ValueError(HOSTILE_ERROR)


@pipeline(name="hostile/<b>pipeline</b>")
def hostile_pipeline() -> None:
    hostile(prepare(n=2))
