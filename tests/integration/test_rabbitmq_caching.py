"""Caching and retried runs on the rabbitmq stack: a real controller process and a real
worker process, the client only publishing and following. The controller finds and checks
the reused outputs; the worker runs only what is not reused."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import (
    Processes,
    processes,
    register_stack,
    run_id_in,
    vhost,
)
from tests.integration.test_step_caching import FIVE

__all__ = ["processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


def described(run_id: str) -> dict[str, Any]:
    result = conveyor_cli("run", "describe", run_id, "-o", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_retry_and_cache_hits_through_a_controller_and_a_worker(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    processes.worker("w1")
    flow = tmp_path / "flow"
    flow.mkdir()
    # The worker runs the steps from the run's code archive, elsewhere: paths are absolute.
    source = FIVE.replace("HERE = Path(__file__).parent", f"HERE = Path({str(flow)!r})")
    (flow / "pipe.py").write_text(source)
    executed = flow / "executed.log"

    failed = conveyor_cli("pipeline", "run", "pipe.py:p", cwd=flow, timeout=90)
    assert failed.returncode == 1, failed.stderr + processes.dump()
    failed_id = run_id_in(failed.stderr)
    assert sorted(executed.read_text().split()) == ["one", "three", "two"]

    (flow / "fixed.flag").touch()
    executed.unlink()
    retried = conveyor_cli("run", "retry", failed_id, cwd=flow, timeout=90)
    assert retried.returncode == 0, retried.stderr + processes.dump()
    assert "five.output = 84" in retried.stdout
    retry_id = run_id_in(retried.stderr)
    assert sorted(executed.read_text().split()) == ["five", "four", "three"]
    steps = {s["name"]: s for s in described(retry_id)["steps"]}
    assert [steps[n]["status"] for n in ("one", "two", "three")] == [
        "cached",
        "cached",
        "completed",
    ]
    assert steps["one"]["cached_from"] == failed_id
    assert described(failed_id)["run"]["retried_by"] == [retry_id]

    # Once more with the cache on: nothing runs, the outputs come from where they were made.
    executed.unlink()
    again = conveyor_cli("pipeline", "run", "pipe.py:p", cwd=flow, timeout=90)
    assert again.returncode == 0, again.stderr + processes.dump()
    assert not executed.exists()
    steps = {s["name"]: s for s in described(run_id_in(again.stderr))["steps"]}
    assert {n: s["cached_from"] for n, s in steps.items()} == {
        "one": failed_id,
        "two": failed_id,
        "three": retry_id,
        "four": retry_id,
        "five": retry_id,
    }
