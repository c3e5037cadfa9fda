"""Pipelines whose steps fail and ask for retries, run by the RabbitMQ tests' worker processes.

Each attempt appends ``NAME TIME`` (wall-clock seconds) to ``$CONVEYOR_TEST_MARKERS/attempts.log``
when it starts and ``NAME-end TIME`` when it ends, so that a test sees every attempt of
every process, and when it ran.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conveyor import Retry, pipeline, step

MARKERS_ENV = "CONVEYOR_TEST_MARKERS"


def _log(name: str) -> int:
    """Record an attempt of ``name``; how many attempts of it there were, this one included."""
    path = Path(os.environ[MARKERS_ENV]) / "attempts.log"
    with open(path, "a") as log:
        log.write(f"{name} {time.time()}\n")
    return sum(line.split()[0] == name for line in path.read_text().splitlines())


@step(retries=2, retry_delay=0.5, backoff=2)
def flaky() -> str:
    attempt = _log("flaky")
    _log("flaky-end")
    if attempt < 3:
        raise ConnectionError(f"attempt {attempt}: the service is not up yet")
    return "ok"


@step
def tick(i: int) -> int:
    _log("tick")
    time.sleep(0.2)
    _log("tick-end")
    return i + 1


@pipeline
def flaky_beside_ticks() -> None:
    flaky()
    n = tick(0)
    for _ in range(9):
        n = tick(n)


@step(retries=1)
def rate_limited(after: float = 4.0) -> str:
    if _log("rate_limited") == 1:
        raise Retry(after=after, reason="rate limited")
    return "served"


@pipeline
def asks_later(after: float = 4.0) -> None:
    rate_limited(after=after)
