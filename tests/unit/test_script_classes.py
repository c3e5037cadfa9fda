"""A stored estimator that holds a class of a pipeline file loads with the class of the same
file of the code at hand: a worker's step takes it from its own run's code archive, a client
from the file its user trusts; a file is imported only for a class the load trusts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.contracts import ArtifactRef, BlobRef, StepSpec
from conveyor.workers import materializers, script_classes
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.materializers.estimators import Skops, UntrustedTypes
from conveyor.workers.script_classes import ScriptClassMissing
from conveyor.workers.step_resolver import StepResolver
from conveyor.workers.steps import FILE_MODULE_PREFIX
from tests.unit.test_step_trust import archive

pytest.importorskip("skops")

FLOW = """\
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from conveyor import step

VERSION = {version}
Path({marker!r}).write_text("imported")


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


@step
def evaluate(model: Pipeline) -> int:
    return VERSION
"""

REF = ArtifactRef(
    uri="file:///store/model",
    digest="blake3:" + "a" * 64,
    size=1,
    materializer="sklearn.skops",
    materializer_version="1",
    data_type="sklearn.pipeline.Pipeline",
)


class Versions:
    """Versions of one pipeline's code archive, and a worker that resolves their steps."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.store = LocalArtifactStore(tmp_path / "store")
        self.worker = StepResolver(self.store, tmp_path / "code-cache")
        self.marker = tmp_path / "imported.marker"

    def code(self, version: int, path: str = "mk.py", source: str = FLOW) -> BlobRef:
        text = source.format(version=version, marker=str(self.marker))
        return archive(self.store, {path: text})

    def model(self, code: BlobRef, *, elsewhere: bool = True) -> str:
        """A skops file of the model that version ``code`` of ``fit`` makes on a worker:
        another process's unless ``elsewhere`` is false."""
        before = set(sys.modules)
        fit = self.worker.resolve(StepSpec(name="fit", ref="mk.py:fit", code=code))
        path = str(self.tmp_path / "model.skops")
        Skops().save(fit.fn(), path)
        self.marker.unlink()
        if elsewhere:
            for name in set(sys.modules) - before:
                if name.startswith(FILE_MODULE_PREFIX):
                    del sys.modules[name]
            self.worker = StepResolver(self.store, self.tmp_path / "code-cache")
        return path

    def load(self, path: str, code: BlobRef, trust: list[str]) -> Any:
        """What the step ``evaluate`` of version ``code`` gets, as a worker loads it."""
        step = StepSpec(name="evaluate", ref="mk.py:evaluate", code=code)
        with (
            materializers.trusting(trust),
            script_classes.taken_from(self.worker.code_at_hand(step)),
        ):
            return Skops().load(path, REF)


@pytest.fixture
def versions(tmp_path: Path) -> Iterator[Versions]:
    before = set(sys.modules)
    yield Versions(tmp_path)
    for name in set(sys.modules) - before:
        if name.startswith(FILE_MODULE_PREFIX):
            del sys.modules[name]


def doubler_of(versions: Versions, code: BlobRef) -> type:
    fit = versions.worker.resolve(StepSpec(name="fit", ref="mk.py:fit", code=code))
    found: type = fit.fn.__globals__["Doubler"]
    return found


def test_a_step_of_a_later_version_loads_the_model_with_its_own_class(
    versions: Versions,
) -> None:
    first, second = versions.code(1), versions.code(2)
    model_file = versions.model(first, elsewhere=False)
    # This worker has the first version's module too: the step's own version wins all the
    # same, so that every worker builds the same class.
    model = versions.load(model_file, second, ["mk.py:Doubler"])
    assert type(model[0]) is doubler_of(versions, second)
    assert type(model[0]) is not doubler_of(versions, first)
    assert list(model.predict([[0.0], [3.0]])) == [0, 1]


def test_a_class_not_trusted_is_refused_by_its_file_name_and_its_file_is_not_imported(
    versions: Versions,
) -> None:
    model_file = versions.model(versions.code(1))
    with pytest.raises(UntrustedTypes) as refused:
        versions.load(model_file, versions.code(2), [])
    assert "trust=['mk.py:Doubler']" in str(refused.value)
    assert not versions.marker.exists()


def test_a_class_the_file_no_longer_defines_is_a_clear_error(versions: Versions) -> None:
    model_file = versions.model(versions.code(1))
    renamed = versions.code(2, source=FLOW.replace("Doubler", "Twice"))
    with pytest.raises(ScriptClassMissing, match=r"mk\.py \(the code at hand\) has no class"):
        versions.load(model_file, renamed, ["mk.py:Doubler"])
    moved = versions.code(2, path="flow.py")
    with pytest.raises(UntrustedTypes, match="has no such file") as refused:
        step = StepSpec(name="evaluate", ref="flow.py:evaluate", code=moved)
        with (
            materializers.trusting(["mk.py:Doubler"]),
            script_classes.taken_from(versions.worker.code_at_hand(step)),
        ):
            Skops().load(model_file, REF)
    assert "mk.py:Doubler" in str(refused.value)


def test_a_step_without_pipeline_code_imports_no_file_a_message_names(
    versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of a trusted package: the trust list came in the message, and this worker's
    working directory holds an ``mk.py``; it is never imported."""
    model_file = versions.model(versions.code(1))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mk.py").write_text(FLOW.format(version=3, marker=str(versions.marker)))
    step = StepSpec(name="evaluate", ref="mypkg.steps:evaluate")
    with (
        materializers.trusting(["mk.py:Doubler"]),
        script_classes.taken_from(versions.worker.code_at_hand(step)),
        pytest.raises(UntrustedTypes, match="ships no pipeline file"),
    ):
        Skops().load(model_file, REF)
    assert not versions.marker.exists()


def test_a_client_loads_the_model_with_the_class_of_the_file_it_trusts(
    versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run.load`` or ``conveyor artifact get`` in the folder of the pipeline file."""
    model_file = versions.model(versions.code(1))
    project = tmp_path / "project"
    project.mkdir()
    (project / "mk.py").write_text(FLOW.format(version=3, marker=str(versions.marker)))
    monkeypatch.chdir(project)
    with pytest.raises(UntrustedTypes) as refused:
        Skops().load(model_file, REF)
    assert "trust=['mk.py:Doubler']" in str(refused.value)
    assert not versions.marker.exists()
    with materializers.trusting(["mk.py:Doubler"]):
        model = Skops().load(model_file, REF)
    assert type(model[0]).__module__ in sys.modules
    assert getattr(sys.modules[type(model[0]).__module__], "VERSION", None) == 3
    assert sys.modules[type(model[0]).__module__].__file__ == str(project / "mk.py")
    assert list(model.predict([[0.0], [3.0]])) == [0, 1]


def test_a_client_that_trusts_another_file_is_told_it_is_not_the_one(
    versions: Versions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_file = versions.model(versions.code(1))
    project = tmp_path / "project"
    project.mkdir()
    (project / "other.py").write_text(FLOW.format(version=3, marker=str(versions.marker)))
    monkeypatch.chdir(project)
    for trust in (["other.py:Doubler"], ["mk.py:Doubler"]):  # another file; no such file
        with materializers.trusting(trust), pytest.raises(UntrustedTypes) as refused:
            Skops().load(model_file, REF)
        assert f"{trust[0]} is not that file" in str(refused.value)
    assert not versions.marker.exists()
