"""Trusting a type of a stored estimator by the name its refusal shows."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.contracts import ArtifactRef
from conveyor.workers import materializers
from conveyor.workers.materializers.estimators import Skops, UntrustedTypes
from conveyor.workers.steps import FILE_MODULE_PREFIX, load_reference, readable

FEATURES = """\
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from conveyor import step


class Doubler(BaseEstimator, TransformerMixin):
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return np.asarray(X) * 2


@step
def fit() -> Pipeline:
    return Pipeline([("double", Doubler()), ("model", LogisticRegression())]).fit(
        [[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1]
    )
"""

REF = ArtifactRef(
    uri="file:///store/model",
    digest="blake3:" + "a" * 64,
    size=1,
    materializer="sklearn.skops",
    materializer_version="1",
    data_type="sklearn.pipeline.Pipeline",
)


@pytest.fixture
def script_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A skops file of a pipeline holding a class of a script loaded by path, as
    `conveyor pipeline run features.py:...` loads it."""
    pytest.importorskip("skops")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "features.py").write_text(FEATURES)
    before = set(sys.modules)
    fit = load_reference("features.py:fit")
    path = str(tmp_path / "model.skops")
    Skops().save(fit.fn(), path)
    yield path
    for name in set(sys.modules) - before:
        if name.startswith(FILE_MODULE_PREFIX):
            del sys.modules[name]


def test_a_script_class_is_trusted_by_the_name_its_refusal_shows(script_model: str) -> None:
    with pytest.raises(UntrustedTypes) as refused:
        Skops().load(script_model, REF)
    # Step errors reach the user through readable(): the script's file stands for its module.
    shown = readable(str(refused.value))
    assert "trust=['features.py:Doubler']" in shown
    with materializers.trusting(["features.py:Doubler"]):
        model = Skops().load(script_model, REF)
    assert list(model.predict([[0.0], [3.0]])) == [0, 1]


def test_a_script_class_this_process_has_not_loaded_is_built_from_the_file_it_trusts(
    script_model: str,
) -> None:
    """``conveyor artifact get`` of a model holding a class of ``features.py``: the CLI never
    loaded that script; trusted by its file, the class is the one of the file it names."""
    for name in [m for m in sys.modules if m.startswith(FILE_MODULE_PREFIX)]:
        del sys.modules[name]
    with pytest.raises(UntrustedTypes, match="from the file it trusts them by") as refused:
        Skops().load(script_model, REF)
    assert "trust=['features.py:Doubler']" in str(refused.value)
    with materializers.trusting(["features.py:Doubler"]):
        model = Skops().load(script_model, REF)
    assert type(model[0]) is load_reference("features.py:Doubler")
