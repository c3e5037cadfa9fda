"""Where a chain step's time goes on a rabbitmq stack: timestamps per hop, medians and means.

Runs a chain of ``--steps`` trivial steps ``--runs`` times on a rabbitmq stack with a
controller process and one worker process, both started with ``hop_trace`` on their path
(its ``sitecustomize`` wraps a few internal functions and writes a timestamp per call).
Then, for each step of the chain after the first, it follows the critical path from the
moment the worker publishes the previous step's ``StepSucceeded``:

    worker publishes StepSucceeded -> controller received it -> its batch starts ->
    commit starts -> committed -> StepReady published -> worker received it ->
    step executes -> executed -> worker publishes its StepSucceeded

and prints each hop's median and mean in milliseconds, with the cost of a run around
its steps (submit until the controller has the request; last step until ``wait`` returns).
The figures are wall-clock times of processes on one machine; compare them with the
floor of ``peers.py`` measured in the same session. The runs have the cache on, each with
other inputs (``overhead.numbered_chain``), so every step runs and goes through the
controller (with the cache off, a chain's steps ride on the one before and skip it: see
docs/performance.md, "Chain riders").

    python benchmarks/hops.py [--steps 101] [--runs 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import numbered_chain  # noqa: E402
from rabbitmq import delete_topology, register, stack_processes  # noqa: E402

from conveyor import Conveyor  # noqa: E402
from conveyor.service.logs import configure_logging  # noqa: E402

HOPS = [
    ("worker publishes StepSucceeded", "controller received it"),
    ("controller received it", "its batch starts"),
    ("its batch starts", "commit starts"),
    ("commit starts", "committed"),
    ("committed", "StepReady published"),
    ("StepReady published", "worker received it"),
    ("worker received it", "step executes"),
    ("step executes", "executed"),
    ("executed", "worker publishes StepSucceeded"),
]

Line = tuple[float, str, str, str]


def read_trace(prefix: str) -> list[Line]:
    lines: list[Line] = []
    for name in glob.glob(f"{prefix}.*"):
        with open(name) as file:
            for text in file:
                parts = text.rstrip("\n").split(" ", 3)
                lines.append((float(parts[0]), parts[1], parts[2], parts[3]))
    lines.sort()
    return lines


def milestone(role: str, tag: str, detail: str) -> str | None:
    """The name of the critical-path moment a trace line marks, if any."""
    if role == "controller":
        if tag == "received" and detail.startswith("StepSucceeded"):
            return "controller received it"
        if tag == "batch":
            return "its batch starts"
        if tag == "commit":
            return "commit starts"
        if tag == "committed":
            return "committed"
        if tag == "publish" and "StepReady" in detail:
            return "StepReady published"
    elif role == "worker":
        if tag == "received" and detail.startswith("StepReady"):
            return "worker received it"
        if tag == "execute":
            return "step executes"
        if tag == "executed":
            return "executed"
    return None


def hops(lines: list[Line]) -> dict[str, list[float]]:
    """Milliseconds of each hop, one sample per chain step."""
    roles: dict[str, str] = {}
    for _, pid, tag, _ in lines:
        if tag == "execute":
            roles[pid] = "worker"
        elif tag == "batch":
            roles[pid] = "controller"
    cycles: list[dict[str, float]] = []
    current: dict[str, float] | None = None
    for at, pid, tag, detail in lines:
        role = roles.get(pid, "client")
        if role == "worker" and tag == "publish" and detail.startswith("StepSucceeded"):
            if current is not None:
                current["worker publishes StepSucceeded (next)"] = at
                cycles.append(current)
            current = {"worker publishes StepSucceeded": at}
            continue
        if tag == "publish" and "RunFinished" in detail:
            current = None  # the run's last step: no next step on the critical path
            continue
        name = milestone(role, tag, detail)
        if current is not None and name is not None and name not in current:
            if name == "worker received it":  # when the message was taken, before decoding
                at = float(detail.split()[-1])
            current[name] = at
    samples: dict[str, list[float]] = {f"{a} -> {b}": [] for a, b in HOPS}
    samples["step (publish to publish)"] = []
    for cycle in cycles:
        if not all(b in cycle for _, b in HOPS[:-1]):
            continue  # a run's first or last step: no full cycle
        for a, b in HOPS:
            stop = cycle[f"{b} (next)" if b == HOPS[0][0] else b]
            samples[f"{a} -> {b}"].append((stop - cycle[a]) * 1000)
        whole = cycle[f"{HOPS[0][0]} (next)"] - cycle[HOPS[0][0]]
        samples["step (publish to publish)"].append(whole * 1000)
    return samples


def around(lines: list[Line]) -> dict[str, list[float]]:
    """Milliseconds of a run outside its steps: submit to the controller's receipt of the
    request, and the last step's end to ``wait`` returning."""
    found: dict[str, list[float]] = {
        "submit -> controller has the request": [],
        "last step -> wait returns": [],
    }
    submitted = requested = executed = None
    for at, _, tag, detail in lines:
        if tag == "submit":
            submitted, requested, executed = at, None, None
        elif tag == "received" and detail.startswith("RunRequested") and requested is None:
            requested = at
            if submitted is not None:
                found["submit -> controller has the request"].append((at - submitted) * 1000)
        elif tag == "executed":
            executed = at
        elif tag == "waited" and executed is not None:
            found["last step -> wait returns"].append((at - executed) * 1000)
    return found


async def measure(args: argparse.Namespace, prefix: str) -> None:
    stack_prefix = f"hops{uuid.uuid4().hex[:8]}"
    client = open(f"{prefix}.client", "a", buffering=1)  # noqa: SIM115, ASYNC230

    def note(tag: str) -> None:
        client.write(f"{time.time():.6f} client {tag} -\n")

    with tempfile.TemporaryDirectory(prefix="conveyor-hops-") as home:
        os.environ["CONVEYOR_HOME"] = home
        await register(args.url, stack_prefix, 2, Path(home) / "artifacts")
        env = {
            **os.environ,
            "CONVEYOR_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join([str(HERE / "hop_trace"), str(HERE)]),
            "CONVEYOR_HOP_TRACE": prefix,
        }
        env.pop("PYTHONASYNCIODEBUG", None)
        try:
            async with Conveyor(stack="bench") as cv:
                with stack_processes(1, env):
                    for number in range(args.runs + 1):  # the first warms up; dropped below
                        note("submit")
                        run = await cv.submit(numbered_chain, n=args.steps, number=number)
                        await run.wait()
                        note("waited")
        finally:
            await delete_topology(args.url, stack_prefix)
            client.close()


def summary(samples: dict[str, list[float]]) -> list[dict[str, object]]:
    return [
        {
            "hop": name,
            "median_ms": round(statistics.median(values), 3),
            "mean_ms": round(statistics.mean(values), 3),
            "samples": len(values),
        }
        for name, values in samples.items()
        if values
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--steps", type=int, default=101, help="steps of the chain")
    parser.add_argument("--runs", type=int, default=8, help="measured runs after a warm-up")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    arguments = parser.parse_args()
    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="conveyor-hop-trace-") as folder:
        trace = str(Path(folder) / "trace")
        asyncio.run(measure(arguments, trace))
        lines = read_trace(trace)
    failed = [detail for _, _, tag, detail in lines if tag == "patch-failed"]
    if failed:
        raise SystemExit(f"hop_trace could not wrap Conveyor's functions: {failed[0]}")
    # The warm-up run is dropped: everything before the second submit.
    submits = [at for at, _, tag, _ in lines if tag == "submit"]
    lines = [line for line in lines if line[0] >= submits[1]]
    rows = summary(hops(lines)) + summary(around(lines))
    if arguments.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'hop':<72}{'median ms':>10}{'mean ms':>10}")
        for row in rows:
            print(f"{row['hop']:<72}{row['median_ms']:>10.3f}{row['mean_ms']:>10.3f}")
