"""Orchestration overhead of the embedded default stack.

Trivial steps, so that nearly all the time is Conveyor's: a chain of 200 and a fan-out of
1,000 (one source, 1,000 consumers, one join); ``--large`` adds a fan-out of 10,000.
Overhead per step = (wall time of the run - time inside step bodies) / steps.

These runs are made with the cache off (every step runs). ``fanout_1000_cached`` is the
fan-out again with the cache on, after a run that filled it: every step is ``cached``, and
what it costs is finding, checking and recording the reused outputs.

    python benchmarks/overhead.py [--large] [--json] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from conveyor import Conveyor, RunStatus, StepStatus, pipeline, step
from conveyor.service.logs import configure_logging


@step
def source() -> int:
    return 0


@step
def bump(x: int) -> int:
    return x + 1


@step
def join(xs: list[int]) -> int:
    return len(xs)


@pipeline
def chain(n: int) -> None:
    value = source()
    for _ in range(n - 1):
        value = bump(value)


@pipeline
def fan_out(n: int) -> None:
    root = source()
    join([bump(root) for _ in range(n)])


@dataclass
class Result:
    workload: str
    steps: int
    seconds: float
    steps_per_s: float
    overhead_ms_per_step: float


async def measure(
    cv: Conveyor, name: str, definition: object, n: int, *, cache: bool = False
) -> Result:
    assert isinstance(definition, type(chain))
    started = time.perf_counter()
    run = await cv.submit(definition, n=n, cache=cache)
    record = await run.wait()
    wall = time.perf_counter() - started
    if record.status is not RunStatus.COMPLETED:
        raise SystemExit(f"{name}: run {record.id} {record.status}: {record.error}")
    steps = await run.steps()
    if cache and any(s.status is not StepStatus.CACHED for s in steps):
        raise SystemExit(f"{name}: run {record.id} ran steps it should have reused")
    inside = sum(s.duration_s or 0.0 for s in steps)
    return Result(
        workload=name,
        steps=len(steps),
        seconds=round(wall, 4),
        steps_per_s=round(len(steps) / wall, 1),
        overhead_ms_per_step=round((wall - inside) / len(steps) * 1000, 4),
    )


async def main(args: argparse.Namespace) -> list[Result]:
    workloads: list[tuple[str, object, int]] = [
        ("chain_200", chain, 200),
        ("fanout_1000", fan_out, 1000),
    ]
    if args.large:
        workloads.append(("fanout_10000", fan_out, 10_000))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as home:
        async with Conveyor(home=home) as cv:
            await measure(cv, "warm-up", chain, 20)
            for name, definition, n in workloads:
                best = min(
                    [await measure(cv, name, definition, n) for _ in range(args.repeat)],
                    key=lambda r: r.seconds,
                )
                results.append(best)
            results.append(await cached_fan_out(cv, args.repeat))
    return results


async def cached_fan_out(cv: Conveyor, repeat: int) -> Result:
    """The best of fully cached runs of the 1,000-step fan-out, each after an uncached run
    of it (interleaved, so that both see the same machine), once a run filled the cache."""
    await measure(cv, "fill", fan_out, 1000, cache=True)
    cached: list[Result] = []
    uncached: list[Result] = []
    for _ in range(repeat):
        uncached.append(await measure(cv, "fanout_1000", fan_out, 1000))
        cached.append(await measure(cv, "fanout_1000_cached", fan_out, 1000, cache=True))
    best = min(cached, key=lambda r: r.seconds)
    base = min(uncached, key=lambda r: r.seconds)
    print(
        f"fully cached fan-out: {best.seconds / base.seconds:.2f} of an uncached one "
        f"({best.seconds:.3f}s vs {base.seconds:.3f}s, best of {repeat} each)",
        file=sys.stderr,
    )
    return best


def print_table(results: list[Result]) -> None:
    print(f"{'workload':<14}{'steps':>7}{'seconds':>10}{'steps/s':>10}{'overhead ms/step':>18}")
    for r in results:
        print(
            f"{r.workload:<14}{r.steps:>7}{r.seconds:>10.3f}{r.steps_per_s:>10.0f}"
            f"{r.overhead_ms_per_step:>18.3f}"
        )


def report(results: Sequence[Result], *, as_json: bool, table: Callable[[Any], None]) -> None:
    """Print ``results`` as JSON lines or through ``table``."""
    if as_json:
        for result in results:
            sys.stdout.write(json.dumps(asdict(result)) + "\n")
    else:
        table(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also a fan-out of 10,000")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; best kept")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    report(asyncio.run(main(arguments)), as_json=arguments.json, table=print_table)
