"""A 1 GiB numpy array through the s3 store: no process holds it twice in memory.

A worker process makes the array and sums it (so it writes and reads it through S3); then a
client process loads it back. Each one's peak resident memory must stay below 1.5 times the
array's size: the bytes go through local files in chunks, never whole through memory.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conveyor.service.client import Client
from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import Processes, processes, run_id_in, vhost
from tests.integration.test_scale_out import register_s3_stack
from tests.s3_support import S3Bucket

__all__ = ["processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

SIZE = int(os.environ.get("CONVEYOR_TEST_BIG_MB", "1024")) << 20

PIPELINE = """
import numpy as np

from conveyor import pipeline, step


@step
def big(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float64)


@step
def total(x: np.ndarray) -> float:
    return float(x.sum())


@pipeline
def big_array(n: int) -> None:
    total(big(n))
"""

LOAD = """
import resource, sys
from conveyor.service.client import Client

with Client() as client:
    value = client.load_artifact(sys.argv[1])
    assert value.nbytes == int(sys.argv[2]), value.nbytes
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(pid: int) -> int:
    """The highest resident set size of a running process so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_1gib_array_crosses_the_s3_store_without_a_second_copy_in_memory(
    vhost: str, s3_bucket: S3Bucket, tmp_path: Path, processes: Processes
) -> None:
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    (client_dir / "big.py").write_text(PIPELINE)
    asyncio.run(register_s3_stack(vhost, s3_bucket))
    processes.controller()
    worker = processes.worker("w1", "--concurrency", "1")
    items = SIZE // 8

    result = conveyor_cli(
        "pipeline", "run", "big.py:big_array", "-p", f"n={items}", cwd=client_dir, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr + processes.dump()
    assert f"total.output = {float(items)}" in result.stdout, result.stdout
    worker_peak = peak_rss(worker.pid)

    with Client() as client:
        [artifact] = [
            a
            for a in client.list_artifacts(run_id=run_id_in(result.stderr))
            if a.step_name == "big"
        ]
    assert artifact.ref.size > SIZE
    loaded = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD), artifact.id, str(SIZE)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert loaded.returncode == 0, loaded.stderr
    client_peak = int(loaded.stdout.split()[-1])

    limit = 1.5 * SIZE
    assert worker_peak < limit, f"worker peak RSS {worker_peak / SIZE:.2f}x the array"
    assert client_peak < limit, f"client peak RSS {client_peak / SIZE:.2f}x the array"
