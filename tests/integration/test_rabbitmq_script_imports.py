"""A script that starts runs at its top level, without ``if __name__ == "__main__":``, run
on the rabbitmq stack (a real controller and worker process). The worker imports the
script to find its steps; the run the script would start there, inside the import, is
refused with the reason, so the script's own run fails with it instead of waiting for ever
on a worker whose slots wait for the import (what it did before)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.service.client import Client
from tests.integration.rabbitmq_support import Processes, processes, register_stack, vhost

__all__ = ["processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

UNGUARDED = """\
import asyncio

from conveyor import Conveyor, pipeline, step


@step
def one() -> int:
    return 1


@pipeline
def p() -> None:
    one()


async def main() -> None:
    async with Conveyor() as cv:
        run = await cv.submit(p)
        record = await run.wait()
        print("run", record.status.value)
        for s in await run.steps():
            print("step", s.name, s.status.value, s.error)


asyncio.run(main())
"""


def script(folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    (folder / "burst.py").write_text(text)
    return subprocess.run(
        [sys.executable, "burst.py"], cwd=folder, capture_output=True, text=True, timeout=120
    )


def test_a_script_that_starts_runs_when_imported_fails_its_run_with_the_reason(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1")
    flow = tmp_path / "flow"
    flow.mkdir()

    unguarded = script(flow, UNGUARDED)
    assert unguarded.returncode == 0, unguarded.stderr + processes.dump()
    assert "run failed" in unguarded.stdout
    assert "step one failed ConveyorError: burst.py starts a run when it is imported" in (
        unguarded.stdout
    )
    assert 'if __name__ == "__main__":' in unguarded.stdout
    with Client() as client:
        assert len(client.list_runs()) == 1, "the import started no run of its own"

    # The same worker runs the script once it keeps its runs to itself.
    guarded = script(
        flow,
        UNGUARDED.replace(
            "\nasyncio.run(main())", '\nif __name__ == "__main__":\n    asyncio.run(main())'
        ),
    )
    assert guarded.returncode == 0, guarded.stderr + processes.dump()
    assert "run completed" in guarded.stdout
