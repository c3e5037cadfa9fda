"""A model that holds a class of the pipeline file, on the rabbitmq stack: a real controller
and real worker processes. The cached model of one version of the code loads in a step of
the next version on a fresh worker, in the client (``run.load``) and in
``conveyor artifact get``, each with the class of the file it has at hand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.service.client import Client
from tests.conftest import conveyor_cli
from tests.integration.rabbitmq_support import (
    Processes,
    processes,
    register_stack,
    run_id_in,
    vhost,
)

__all__ = ["processes", "vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq

FLOW = """\
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from conveyor import pipeline, step

VERSION = 1


class Doubler(BaseEstimator, TransformerMixin):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2


@step
def train() -> Pipeline:
    return Pipeline([("double", Doubler()), ("model", LogisticRegression())]).fit(
        [[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1]
    )


@step(trust=["mk.py:Doubler"])
def evaluate(model: Pipeline) -> str:
    # The class this version of the file defines, not the one of the version that trained it.
    current = type(model[0]) is Doubler
    return f"v{VERSION} current={current} {[int(p) for p in model.predict([[0.0], [3.0]])]}"


@pipeline
def p() -> None:
    evaluate(train())


if __name__ == "__main__":
    run = p()
    model = run.load("train", trust=["mk.py:Doubler"])
    print("loaded", type(model[0]) is Doubler, [int(p) for p in model.predict([[0.0], [3.0]])])
"""


def steps_of(run_id: str) -> dict[str, dict[str, object]]:
    result = conveyor_cli("run", "describe", run_id, "-o", "json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["steps"]}


def test_a_cached_model_of_a_script_class_loads_in_the_next_version_and_the_client(
    vhost: str, tmp_path: Path, processes: Processes
) -> None:
    asyncio.run(register_stack(vhost, tmp_path / "artifacts"))
    processes.controller()
    first_worker = processes.worker("w1")
    flow = tmp_path / "flow"
    flow.mkdir()
    (flow / "mk.py").write_text(FLOW)

    # The first version trusts the class itself, as its user has it: its module's name on
    # the client is of no use on a worker, which finds it by the file's name in the code.
    (flow / "mk.py").write_text(
        FLOW.replace('@step(trust=["mk.py:Doubler"])', "@step(trust=[Doubler])")
    )
    first = conveyor_cli("pipeline", "run", "mk.py:p", cwd=flow, timeout=120)
    assert first.returncode == 0, first.stderr + processes.dump()
    assert "v1 current=True [0, 1]" in first.stdout
    first_id = run_id_in(first.stderr)

    # A later version of the code (another step changed), on a worker that never saw the first.
    first_worker.kill()
    processes.worker("w2")
    (flow / "mk.py").write_text(FLOW.replace("VERSION = 1", "VERSION = 2"))
    second = subprocess.run(
        [sys.executable, "mk.py"],
        cwd=flow,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr + processes.dump()
    # run.load in the script: the class is the one of the script that loads it.
    assert "loaded True [0, 1]" in second.stdout
    with Client() as client:
        runs = [r for r in client.list_runs() if r.id != first_id]
        [second_run] = runs
        [model] = [a for a in client.list_artifacts(run_id=first_id) if a.step_name == "train"]
    steps = steps_of(second_run.id)
    assert steps["train"]["status"] == "cached"
    assert steps["evaluate"]["status"] == "completed"
    with Client() as client:
        [score] = [
            a for a in client.list_artifacts(run_id=second_run.id) if a.step_name == "evaluate"
        ]
        assert client.load_artifact(score.id) == "v2 current=True [0, 1]"

    # conveyor artifact get, from the folder of the pipeline file: trusted by its file name.
    got = conveyor_cli("artifact", "get", model.id, "--trust", "mk.py:Doubler", cwd=flow)
    assert got.returncode == 0, got.stderr
    assert "Doubler()" in got.stdout
    untrusted = conveyor_cli("artifact", "get", model.id, cwd=flow)
    assert untrusted.returncode != 0
    assert "trust=['mk.py:Doubler']" in untrusted.stderr
