"""Pipelines that worker processes of the RabbitMQ tests import by file path.

Steps append ``NAME PID`` to ``$CONVEYOR_TEST_MARKERS/starts.log`` when they start, so a
test knows which process runs what; a gated step then waits until the test creates
``release-NAME`` in that folder, which is how a test holds a step in the middle.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from conveyor import pipeline, step

MARKERS_ENV = "CONVEYOR_TEST_MARKERS"


def _markers() -> Path:
    return Path(os.environ[MARKERS_ENV])


def _record(name: str) -> None:
    with open(_markers() / "starts.log", "a") as log:
        log.write(f"{name} {os.getpid()}\n")


@step
def seed(value: int = 1) -> int:
    _record("seed")
    return value


@step
def gated(x: int, name: str = "gated") -> int:
    _record(name)
    release = _markers() / f"release-{name}"
    deadline = time.monotonic() + 110
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.05)
    return x + 10


@step
def plus(x: int, name: str = "plus", pause_s: float = 0.0) -> int:
    _record(name)
    time.sleep(pause_s)
    return x + 100


@pipeline
def gated_chain() -> None:
    plus(gated(seed(), name="gate"), name="last")


@pipeline
def relay() -> None:
    """A chain of four: with the cache off, the last three ride on the first's StepReady."""
    plus(plus(plus(seed(), name="first"), name="middle"), name="last")


@pipeline
def slow_relay() -> None:
    """``relay`` with a ``first`` step too long for ``middle`` to run in place after it."""
    plus(plus(plus(seed(), name="first", pause_s=1.2), name="middle"), name="last")


@pipeline
def paced_relay() -> None:
    """``relay`` with a ``middle`` step that outlasts the time a worker holds the outcomes
    of a chain's quick steps to send them together: those of ``seed`` and ``first`` go out
    while it runs."""
    plus(plus(plus(seed(), name="first"), name="middle", pause_s=0.5), name="last")


@pipeline
def small(value: int = 1) -> None:
    plus(seed(value=value), name="last")


@step(pool="gpu")
def on_gpu(x: int) -> int:
    _record("on_gpu")
    return x * 2


@pipeline
def pooled() -> None:
    on_gpu(seed())


@step
def slow(x: int, name: str = "slow", seconds: float = 0.3) -> int:
    _record(name)
    time.sleep(seconds)
    return x + 1


@step
def gated_sum(xs: list[int], name: str = "join") -> int:
    _record(name)
    release = _markers() / f"release-{name}"
    deadline = time.monotonic() + 110
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        time.sleep(0.05)
    return sum(xs)


@pipeline
def gated_fan_out(width: int = 6) -> None:
    """A seed, ``width`` branches of a second each, then a join held by its gate."""
    root = seed()
    gated_sum([slow(root, name=f"branch-{i}", seconds=1.0) for i in range(width)], name="join")


@pipeline
def overlong() -> None:
    """A step of 3 s with no timeout of its own."""
    slow(seed(), name="overlong", seconds=3.0)


@step
def suicide(x: int) -> int:
    """Kills the worker running it, as a segfault or the OOM killer would."""
    _record("suicide")
    os.kill(os.getpid(), signal.SIGKILL)
    return x


@step(timeout=0.5)
def hangs(x: int, name: str = "hangs") -> int:
    """A sync step that outlives its timeout by far (a hung client, a dead lock)."""
    _record(name)
    time.sleep(600)
    return x


@pipeline
def doomed() -> None:
    """A step that kills its worker on every delivery, between two ordinary ones."""
    plus(suicide(seed()), name="after")


@step
def join_all(xs: list[int]) -> int:
    _record("join")
    return sum(xs)


@pipeline
def wide(width: int = 24) -> None:
    """A seed, ``width`` quick branches (``plus`` to ``plus_24``) and their join: the
    branches go out a few to a message, as siblings."""
    root = seed()
    join_all([plus(root, name=f"branch-{i}") for i in range(width)])


@pipeline
def roots(width: int = 24) -> None:
    """``width`` seeds with nothing upstream, dispatched at once a few to a message (as
    siblings), and their join."""
    join_all([seed(value=i) for i in range(width)])


@pipeline
def doomed_branch(width: int = 23) -> None:
    """A seed, then a branch that kills its worker on every delivery, dispatched first and
    so with the first ``plus`` branches as its siblings, then the other branches."""
    root = seed()
    suicide(root)
    for i in range(width):
        plus(root, name=f"branch-{i}")


@step
async def waiting(x: int, name: str = "waiting") -> int:
    """An async step held by its gate; records ``cancelled-NAME`` if it is cancelled."""
    _record(name)
    release = _markers() / f"release-{name}"
    try:
        while not release.exists():  # noqa: ASYNC110 (another process makes the file)
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        (_markers() / f"cancelled-{name}").touch()
        raise
    return x + 10


@pipeline
def waiting_chain() -> None:
    plus(waiting(seed(), name="wait"), name="last")


@pipeline
def hung_pair() -> None:
    root = seed()
    hangs(root, name="hung-1")
    hangs(root, name="hung-2")
