"""Pipelines that the CLI tests run in subprocesses, loaded by file path."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conveyor import pipeline, step


@step
def numbers(n: int = 5) -> list[int]:
    return list(range(n))


@step
def square(xs: list[int]) -> list[int]:
    time.sleep(0.05)
    return [x * x for x in xs]


@step
def total(xs: list[int]) -> dict[str, int]:
    return {"total": sum(xs)}


@pipeline
def squares(n: int = 5) -> None:
    total(square(numbers(n=n)))


@step
def explode(xs: list[int]) -> int:
    raise KeyError("no such column: 'label'")


@pipeline
def failing() -> None:
    explode(numbers())


@step
def hang() -> int:
    Path(os.environ["CONVEYOR_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(60)
    return 1


@pipeline
def hanging() -> None:
    total([hang()])


@step
def chatty(n: int = 3) -> int:
    import logging

    print(f"loading {n} rows")
    logging.getLogger("chatty").warning("row 2 looks odd")
    return n


@step
def grumpy(x: int) -> int:
    print(f"about to fail with {x}")
    raise ValueError("bad row")


@pipeline
def talking() -> None:
    grumpy(chatty())
