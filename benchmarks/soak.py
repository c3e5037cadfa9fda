"""Soak: the fault suite's campaign, longer. Prints the counts and recovery times as tables.

A controller and worker processes of a rabbitmq stack (on a fresh vhost of the broker at
--url, through a TCP proxy) run ``--runs`` runs of a small DAG, one every ``--every``
seconds, while a seeded nemesis applies ``--faults`` faults of the chosen kinds: SIGKILL a
worker or the controller (restarted), SIGSTOP either, cut or blackhole every broker
connection, or make the broker go away for a while. Then the checker counts runs submitted,
completed, failed with a reason, lost, stuck, re-executions, effects applied twice, dead
letters and integrity problems (see ``tests/faults/checker.py``), and the exit status is 1
if anything that must be zero is not.

    python benchmarks/soak.py --runs 200 [--faults 60] [--seed 1]
        [--kinds kill-worker,kill-controller,freeze-worker,freeze-controller,cut-broker,...]
        [--workers 3] [--concurrency 2] [--every 1.0] [--hold 1.5,5] [--lease S]
        [--width 3] [--settle 120] [--json]

``--width 1`` makes the DAG a chain of four (source, one branch, join, report): every step
after the first rides on the one before (runs are submitted with the cache off), so the
faults strike workers that forward steps.

Needs RabbitMQ (and ``rabbitmqctl``, to make the vhost) on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conveyor.service.logs import configure_logging  # noqa: E402
from tests.faults.campaign import Campaign, Outcome, report, run_campaign  # noqa: E402
from tests.faults.nemesis import parse_kinds  # noqa: E402
from tests.integration.rabbitmq_support import fresh_vhost  # noqa: E402

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _hold(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    bounds = (float(low), float(high or low))
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError("give MIN,MAX seconds with 0 < MIN <= MAX")
    return bounds


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs to submit")
    parser.add_argument("--faults", type=int, help="faults to apply (default: runs / 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    parser.add_argument("--kinds", type=parse_kinds, default="all", help="fault kinds, or all")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="steps per worker at once")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between submissions")
    parser.add_argument(
        "--hold", type=_hold, default="1.5,5", help="freeze and outage length MIN,MAX s"
    )
    parser.add_argument(
        "--lease",
        type=float,
        default=2.5,
        help="lease_s of the stack: a frozen worker's steps go to another after this long",
    )
    parser.add_argument("--width", type=int, default=3, help="branches of the DAG's fan-out")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds runs may finish in")
    parser.add_argument("--url", default=DEFAULT_URL, help="AMQP URL of the broker")
    parser.add_argument("--workdir", type=Path, help="keep store, ledger and logs here")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    return parser.parse_args()


def _as_json(outcome: Outcome) -> str:
    return json.dumps(
        {
            "counts": outcome.verdict.counts(),
            "problems": outcome.verdict.problems(),
            "recoveries": [dataclasses.asdict(r) for r in outcome.recoveries],
            "unplanned_exits": [(u.label, u.code) for u in outcome.unplanned],
            "elapsed_s": round(outcome.elapsed_s, 1),
        },
        indent=2,
    )


def main() -> int:
    args = _arguments()
    configure_logging("INFO")
    campaign = Campaign(
        runs=args.runs,
        every_s=args.every,
        faults=args.faults if args.faults is not None else max(1, args.runs // 3),
        kinds=args.kinds,
        seed=args.seed,
        workers=args.workers,
        concurrency=args.concurrency,
        settle_s=args.settle,
        lease_s=args.lease,
        hold_s=args.hold,
        width=args.width,
    )
    with fresh_vhost(args.url) as url, tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        workdir = args.workdir or Path(scratch)
        outcome = asyncio.run(run_campaign(campaign, url, workdir))
    print(_as_json(outcome) if args.json else report(outcome))
    if args.workdir:
        print(f"store, ledger and process logs kept in {args.workdir}", file=sys.stderr)
    return 1 if outcome.verdict.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
