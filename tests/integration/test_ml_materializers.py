"""What ML code returns, through a pipeline on the embedded stack: DataFrames, fitted
scikit-learn models, torch tensors, directories and containers of them load back equal in
the next step and through run.load(), and pickle is never called."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

import conveyor
from conveyor import RunFailed, StepStatus, pipeline, step
from conveyor.workers.materializers.estimators import UntrustedTypes
from tests.integration.cli_helpers import ok, refused

FRAME = pd.DataFrame(
    {"x": [1.5, 2.5, None], "label": ["a", "b", "c"], "n": [1, 2, 3]},
    index=pd.Index([10, 20, 30], name="row"),
)
TENSOR = torch.arange(12, dtype=torch.float32).reshape(3, 4)
X = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1], [0.1, 0.8], [0.8, 0.3]])
Y = np.array([0, 1, 0, 1, 0, 1])
TREE = {"data/a.txt": b"alpha\n", "data/sub/b.bin": bytes(range(256)) * 4}


def tree_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by its path relative to root's parent."""
    return {str(p.relative_to(root.parent)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@step
def make_frame() -> pd.DataFrame:
    return FRAME.copy()


@step
def fit_model() -> LogisticRegression:
    return LogisticRegression().fit(X, Y)


@step
def make_tensor() -> torch.Tensor:
    return TENSOR.clone()


@step
def make_folder(where: str) -> Path:
    for name, data in TREE.items():
        path = Path(where, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Path(where, "data")


@step
def check_all(
    frame: pd.DataFrame, model: LogisticRegression, tensor: torch.Tensor, folder: Path
) -> dict[str, bool]:
    expected = LogisticRegression().fit(X, Y)
    return {
        "frame": frame.equals(FRAME) and frame.index.name == "row",
        "model": bool(np.array_equal(model.predict_proba(X), expected.predict_proba(X))),
        "tensor": bool(torch.equal(tensor, TENSOR)),
        "folder": folder.is_dir() and tree_of(folder) == TREE,
    }


@pipeline
def ml_outputs(where: str) -> None:
    check_all(make_frame(), fit_model(), make_tensor(), make_folder(where))


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every way into pickle raises (and is counted) in this process while the test runs."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"pickle.{name} was called")

        return refused

    for name in ("dump", "dumps", "load", "loads", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse(name))
    yield calls
    assert calls == []


def test_ml_values_load_back_equal_in_the_next_step_and_through_run_load(
    tmp_path: Path, no_pickle: list[str]
) -> None:
    run = ml_outputs(where=str(tmp_path / "made"))
    assert run.load("check_all") == {"frame": True, "model": True, "tensor": True, "folder": True}

    frame = run.load("make_frame")
    pd.testing.assert_frame_equal(frame, FRAME)
    model = run.load("fit_model")
    assert isinstance(model, LogisticRegression)
    np.testing.assert_array_equal(model.coef_, LogisticRegression().fit(X, Y).coef_)
    assert torch.equal(run.load("make_tensor"), TENSOR)
    folder = run.load("make_folder")
    assert isinstance(folder, Path) and folder.name == "data" and tree_of(folder) == TREE
    assert not folder.is_relative_to(tmp_path / "made")  # a copy, not the step's folder

    written = {name: s.outputs["output"] for name, s in run.steps.items() if s.outputs}
    assert {name: (r.materializer, r.materializer_version) for name, r in written.items()} == {
        "make_frame": ("pandas.dataframe", "1"),
        "fit_model": ("sklearn.skops", "1"),
        "make_tensor": ("torch.tensor", "1"),
        "make_folder": ("path", "1"),
        "check_all": ("json", "1"),
    }
    assert no_pickle == []


class Doubler(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """A transformer of the user's own: skops does not know it."""

    def fit(self, x: Any, y: Any = None) -> Doubler:
        return self

    def transform(self, x: Any) -> Any:
        return np.asarray(x) * 2


DOUBLER = f"{__name__}.Doubler"


@step
def fit_custom() -> Pipeline:
    return Pipeline([("double", Doubler()), ("model", LogisticRegression())]).fit(X, Y)


@step
def predict(model: Pipeline) -> list[int]:
    return [int(v) for v in model.predict(X)]


@step(trust=[DOUBLER])
def predict_trusting(model: Pipeline) -> list[int]:
    return [int(v) for v in model.predict(X)]


@pipeline
def untrusted() -> None:
    predict(fit_custom())


@pipeline
def trusted() -> None:
    predict_trusting(fit_custom())


def test_an_untrusted_estimator_type_is_refused_by_name_until_it_is_trusted(
    no_pickle: list[str],
) -> None:
    with pytest.raises(RunFailed) as raised:
        untrusted()
    failure = raised.value
    assert failure.step == "predict"
    assert DOUBLER in (failure.step_error or "")
    assert "trust=[" in (failure.step_error or "")
    handle = failure.run
    assert handle.step_statuses["fit_custom"] is StepStatus.COMPLETED
    with pytest.raises(UntrustedTypes, match=DOUBLER):
        handle.load("fit_custom")
    model = handle.load("fit_custom", trust=[DOUBLER])
    assert list(model.predict(X)) == list(Y)

    assert trusted().load("predict_trusting") == list(Y)

    artifact = handle.steps["fit_custom"].outputs["output"]
    with conveyor.Client() as client:
        found = client.list_artifacts(run_id=handle.id)
    artifact_id = next(a.id for a in found if a.ref.digest == artifact.digest)
    assert DOUBLER in refused("artifact", "get", artifact_id)
    assert "Pipeline" in ok("artifact", "get", artifact_id, "--trust", DOUBLER).stdout


@step
def make_bundle(where: str) -> dict[str, Any]:
    Path(where).write_text("notes")
    return {
        "frame": FRAME.copy(),
        "tensors": [TENSOR.clone(), (TENSOR * 2).clone()],
        "file": Path(where),
        "meta": {"epochs": 3},
    }


@step(isolation="process")
def make_state() -> dict[str, torch.Tensor]:
    """Written by the step's own child process, moved into the store by the worker."""
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(2, 3))
        layer.bias.copy_(torch.zeros(2))
    return dict(layer.state_dict())


@step
def read_bundle(bundle: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    return [
        type(bundle["frame"]).__name__,
        str(bundle["tensors"][1].sum().item()),
        bundle["file"].read_text(),
        str(bundle["meta"]),
        ",".join(state),
    ]


@pipeline
def bundles(where: str) -> None:
    read_bundle(make_bundle(where), make_state())


def test_containers_and_state_dicts_round_trip(tmp_path: Path, no_pickle: list[str]) -> None:
    run = bundles(where=str(tmp_path / "notes.txt"))
    assert run.load("read_bundle") == [
        "DataFrame",
        "132.0",
        "notes",
        "{'epochs': 3}",
        "weight,bias",
    ]
    bundle = run.load("make_bundle")
    pd.testing.assert_frame_equal(bundle["frame"], FRAME)
    assert torch.equal(bundle["tensors"][0], TENSOR) and len(bundle["tensors"]) == 2
    assert bundle["file"].read_text() == "notes" and bundle["meta"] == {"epochs": 3}
    assert run.steps["make_bundle"].outputs["output"].materializer == "container"
    state = run.load("make_state")
    assert list(state) == ["weight", "bias"]
    assert torch.equal(state["weight"], torch.ones(2, 3))
    assert run.steps["make_state"].outputs["output"].materializer == "torch.state_dict"


@step
def linked_folder(where: str) -> Path:
    folder = Path(where, "tree")
    folder.mkdir(parents=True)
    (folder / "escape").symlink_to("/etc")
    return folder


@pipeline
def linking(where: str) -> None:
    linked_folder(where)


def test_a_directory_holding_a_symlink_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunFailed) as raised:
        linking(where=str(tmp_path))
    assert "escape is a symbolic link" in (raised.value.step_error or "")
