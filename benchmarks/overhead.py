"""Orchestration overhead of the embedded default stack.

Trivial steps, so that nearly all the time is Conveyor's: a chain of 200, a fan-out of
1,000 (one source, 1,000 consumers, one join) and 100 concurrent runs of a 10-step chain
submitted at once (``concurrent_runs``: how long each waits for its result); ``--large``
adds a fan-out of 10,000, ``--huge`` fan-outs of 50,000 and 100,000 (one run each).
Overhead per step = (wall time of the run - time inside step bodies) / steps.

These runs are made with the cache off (every step runs). ``fanout_1000_cached`` is the
fan-out again with the cache on, after a run that filled it: every step is ``cached``, and
what it costs is finding, checking and recording the reused outputs.

Each workload runs in a fresh process, so that ``peak_rss_mb`` (the peak resident memory of
that process until its runs finished: Python, Conveyor, the stack and the runs; reading the
step records back for the overhead figure comes after) is the workload's own; ``build_s``
is the time the pipeline took to compile into its DAG.

    python benchmarks/overhead.py [--large] [--huge] [--json] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
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
def numbered_chain(n: int, number: int) -> None:
    """``chain`` whose values are ``number * n + 1`` and up: with the cache on, a run of
    another number reuses nothing (no step has another's inputs), and nothing rides (every
    step goes through the controller)."""
    value = bump(number * n)
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
    peak_rss_mb: float = 0.0
    build_s: float | None = None
    p50_s: float | None = None
    p99_s: float | None = None
    makespan_s: float | None = None


WORKLOADS: dict[str, tuple[Any, int]] = {
    "chain_200": (chain, 200),
    "fanout_1000": (fan_out, 1000),
    "fanout_10000": (fan_out, 10_000),
    "fanout_50000": (fan_out, 50_000),
    "fanout_100000": (fan_out, 100_000 - 2),  # with the source and the join: MAX_STEPS
}
ONCE = {"fanout_50000", "fanout_100000"}
"""Workloads run once, whatever ``--repeat`` says: each takes a minute or more."""
CONCURRENT_RUNS = 100
CONCURRENT_STEPS = 10


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB (it never goes down)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


async def measure(
    cv: Conveyor, name: str, definition: object, n: int, *, cache: bool = False
) -> Result:
    assert isinstance(definition, type(chain))
    started = time.perf_counter()
    spec, definitions = definition.with_options(cache=cache).compile(n=n)
    built = time.perf_counter() - started
    run = await cv.submit_compiled(spec, definitions)
    record = await run.wait()
    wall = time.perf_counter() - started
    peak = peak_rss_mb()  # before the benchmark reads every step record back
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
        peak_rss_mb=peak,
        build_s=round(built, 4),
    )


async def measure_concurrent(cv: Conveyor, runs: int, steps: int) -> Result:
    """``runs`` chains submitted one after another at once; each run's latency is from the
    first submit to its end, as a caller who submitted them together sees it."""
    started = time.perf_counter()
    handles = [await cv.submit(chain, n=steps, cache=False) for _ in range(runs)]
    latencies: list[float] = []

    async def wait(handle: Any) -> None:
        record = await handle.wait()
        if record.status is not RunStatus.COMPLETED:
            raise SystemExit(f"concurrent_runs: run {record.id} {record.status}")
        latencies.append(time.perf_counter() - started)

    async with asyncio.TaskGroup() as group:
        for handle in handles:
            group.create_task(wait(handle))
    peak = peak_rss_mb()
    makespan = max(latencies)
    inside = 0.0
    for handle in handles:
        inside += sum(s.duration_s or 0.0 for s in await handle.steps())
    total = runs * steps
    latencies.sort()
    return Result(
        workload="concurrent_runs",
        steps=total,
        seconds=round(makespan, 4),
        steps_per_s=round(total / makespan, 1),
        overhead_ms_per_step=round((makespan - inside) / total * 1000, 4),
        peak_rss_mb=peak,
        p50_s=round(statistics.median(latencies), 4),
        p99_s=round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 4),
        makespan_s=round(makespan, 4),
    )


async def run_workload(name: str, repeat: int) -> Result:
    """Measure one workload in this process: warm up, run it ``repeat`` times, keep the
    fastest, and note this process's peak memory."""
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as home:
        async with Conveyor(home=home) as cv:
            await measure(cv, "warm-up", chain, 20)
            results: list[Result] = []
            for _ in range(1 if name in ONCE else repeat):
                if name == "fanout_1000_cached":  # its own interleaved rounds
                    results.append(await cached_fan_out(cv, repeat))
                    break
                if name == "concurrent_runs":
                    results.append(await measure_concurrent(cv, CONCURRENT_RUNS, CONCURRENT_STEPS))
                else:
                    definition, n = WORKLOADS[name]
                    results.append(await measure(cv, name, definition, n))
    best = min(results, key=lambda r: r.seconds)
    best.peak_rss_mb = max(r.peak_rss_mb for r in results)
    return best


def in_child(name: str, repeat: int) -> Result:
    """``name`` measured in a fresh Python process: its peak memory is the workload's own."""
    out = subprocess.run(
        [sys.executable, __file__, "--workload", name, "--repeat", str(repeat)],
        check=True,
        stdout=subprocess.PIPE,  # stderr passes through: the cached ratio is printed there
        text=True,
    )
    return Result(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(args: argparse.Namespace) -> list[Result]:
    names = ["chain_200", "fanout_1000", "fanout_1000_cached", "concurrent_runs"]
    if args.large:
        names.append("fanout_10000")
    if args.huge:
        names += ["fanout_50000", "fanout_100000"]
    return [in_child(name, args.repeat) for name in names]


def _optional(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


async def cached_fan_out(cv: Conveyor, repeat: int) -> Result:
    """The best of fully cached runs of the 1,000-step fan-out, each after an uncached run
    of it (interleaved, so that both see the same machine), once a run filled the cache."""
    # Outputs of a run with the cache off are recorded with their keys too, for later runs.
    await measure(cv, "fill", fan_out, 1000)
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
    print(
        f"{'workload':<16}{'steps':>7}{'seconds':>10}{'steps/s':>10}{'overhead ms/step':>18}"
        f"{'peak MB':>9}{'build s':>9}{'p50 s':>8}{'p99 s':>8}"
    )
    for r in results:
        print(
            f"{r.workload:<16}{r.steps:>7}{r.seconds:>10.3f}{r.steps_per_s:>10.0f}"
            f"{r.overhead_ms_per_step:>18.3f}{r.peak_rss_mb:>9.0f}"
            f"{_optional(r.build_s, '.3f', 9)}{_optional(r.p50_s, '.2f', 8)}"
            f"{_optional(r.p99_s, '.2f', 8)}"
        )


def report(results: Sequence[Result], *, as_json: bool, table: Callable[[Any], None]) -> None:
    """Print ``results`` as JSON lines (keys without a value left out) or through ``table``."""
    if as_json:
        for result in results:
            line = {k: v for k, v in asdict(result).items() if v is not None}
            sys.stdout.write(json.dumps(line) + "\n")
    else:
        table(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also a fan-out of 10,000")
    parser.add_argument("--huge", action="store_true", help="also fan-outs of 50,000 and 100,000")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload; best kept")
    parser.add_argument(
        "--workload",
        choices=[*WORKLOADS, "fanout_1000_cached", "concurrent_runs"],
        help=argparse.SUPPRESS,
    )
    arguments = parser.parse_args()
    configure_logging("WARNING")
    if arguments.workload:  # the child process of one workload
        result = asyncio.run(run_workload(arguments.workload, arguments.repeat))
        report([result], as_json=True, table=print_table)
    else:
        report(main(arguments), as_json=arguments.json, table=print_table)
