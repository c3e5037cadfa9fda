"""Materializers other libraries ship: one registered through conveyor.register_materializer,
one through the conveyor.materializers entry-point group (a dist-info on sys.path), each
used by a pipeline on the embedded stack; and importing conveyor imports no ML library."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import conveyor
from conveyor import pipeline, step
from conveyor.contracts import ArtifactRef
from conveyor.workers.materializers import REGISTRY


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y


class Point3(Point):
    """A subclass: the materializer registered for Point takes it too."""


class PointMaterializer:
    name = "test.point"
    version = "7"

    def handles(self, value: object) -> bool:
        return isinstance(value, Point)

    def save(self, value: object, path: str) -> str | None:
        assert isinstance(value, Point)
        Path(path).write_text(json.dumps([value.x, value.y]))
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        return Point(*json.loads(Path(path).read_text()))


@pytest.fixture
def registered() -> Iterator[None]:
    conveyor.register_materializer(PointMaterializer(), [Point])
    yield
    REGISTRY.unregister("test.point")


@step
def make_point() -> Point:
    return Point3(1.5, -2.0)


@step
def norm(point: Point) -> float:
    return float(point.x**2 + point.y**2)


@pipeline
def points() -> None:
    norm(make_point())


def test_a_materializer_registered_through_the_api_stores_its_type_and_subclasses(
    registered: None,
) -> None:
    run = points()
    assert run.load("norm") == 6.25
    ref = run.steps["make_point"].outputs["output"]
    assert (ref.materializer, ref.materializer_version) == ("test.point", "7")
    back = run.load("make_point")
    assert isinstance(back, Point) and (back.x, back.y) == (1.5, -2.0)


PLUGIN = """
import json
from pathlib import Path


class Celsius:
    def __init__(self, degrees):
        self.degrees = degrees


class CelsiusMaterializer:
    name = "celsius"
    version = "2"
    types = ("celsius_plugin.Celsius",)

    def handles(self, value):
        return isinstance(value, Celsius)

    def save(self, value, path):
        Path(path).write_text(json.dumps(value.degrees))

    def load(self, path, ref):
        return Celsius(json.loads(Path(path).read_text()))
"""


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A distribution with an entry point, as pip would install it, on sys.path."""
    site = tmp_path / "site"
    (site / "celsius_plugin").mkdir(parents=True)
    (site / "celsius_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "celsius_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: celsius-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[conveyor.materializers]\ncelsius = celsius_plugin:CelsiusMaterializer\n"
    )
    monkeypatch.syspath_prepend(str(site))
    REGISTRY.reload_plugins()
    yield
    sys.modules.pop("celsius_plugin", None)
    monkeypatch.undo()
    REGISTRY.reload_plugins()


@step
def reading() -> object:
    from celsius_plugin import Celsius  # type: ignore[import-not-found]

    return Celsius(21.5)


@step
def fahrenheit(temperature: object) -> float:
    return float(temperature.degrees) * 9 / 5 + 32  # type: ignore[attr-defined]


@pipeline
def weather() -> None:
    fahrenheit(reading())


def test_a_materializer_shipped_through_an_entry_point_is_used(plugin_on_path: None) -> None:
    run = weather()
    assert run.load("fahrenheit") == 70.7
    ref = run.steps["reading"].outputs["output"]
    assert (ref.materializer, ref.materializer_version) == ("celsius", "2")
    assert run.load("reading").degrees == 21.5


def test_an_entry_point_that_does_not_load_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[conveyor.materializers]\nbroken = nowhere:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    REGISTRY.reload_plugins()
    try:
        assert REGISTRY.plugins() == []
        assert REGISTRY.choose([1], allow_pickle=False, what="x").name == "json"
    finally:
        monkeypatch.undo()
        REGISTRY.reload_plugins()


def test_importing_conveyor_and_storing_plain_values_imports_no_ml_library(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import conveyor
        from conveyor.workers.artifact_store_local import LocalArtifactStore
        from conveyor.workers.execution import load_artifact, save_artifact
        conveyor.register_materializer, conveyor.step, conveyor.pipeline
        store = LocalArtifactStore({str(tmp_path / "store")!r})
        for value in ({{"a": [1]}}, [1, "x"], "text", b"raw"):
            ref = save_artifact(store, value, allow_pickle=False, what="v")
            assert load_artifact(store, ref, allow_pickle=False) == value
        heavy = {{"pandas", "pyarrow", "polars", "sklearn", "skops", "torch", "safetensors"}}
        print(sorted(heavy & set(sys.modules)))
        """
    )
    found = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]"
