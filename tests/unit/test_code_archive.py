"""Code archives, as a client packs them: what a run ships, that the same source gives the
same digest, that an archive is stored once, and how a step's trusted classes travel. A
worker's side (extracting them) is tests/unit/test_code_cache.py."""

from __future__ import annotations

import importlib
import os
import sys
import types
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from conveyor import pipeline
from conveyor.contracts import BlobRef, ConveyorError, PipelineSpec
from conveyor.workers import code_archive
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.code_archive import attach_code, pack
from conveyor.workers.steps import StepDefinition, load_reference
from tests.unit.test_notebook_code import cells

T = TypeVar("T")

STEP_SCRIPT = """\
from conveyor import step
import helper

@step
def train() -> int:
    return helper.VALUE
"""


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def script_project(root: Path) -> dict[str, StepDefinition]:
    """A script beside a helper, with everything a project folder holds that must not ship."""
    write(
        root,
        {
            "train.py": STEP_SCRIPT,
            "helper.py": "VALUE = 1\n",
            "sub/util.py": "X = 1\n",
            "data.csv": "a,b\n1,2\n",
            ".venv/pyvenv.cfg": "home = /usr\n",
            ".venv/lib/python3.11/site-packages/dep.py": "",
            "env/pyvenv.cfg": "home = /usr\n",
            "env/lib/mod.py": "",
            ".git/hooks/hook.py": "",
            "__pycache__/helper.cpython-311.py": "",
            "node_modules/pkg/index.py": "",
            "site-packages/dep.py": "",
            ".hidden/secret.py": "",
        },
    )
    definition = load_reference(f"{root / 'train.py'}:train")
    assert isinstance(definition, StepDefinition)
    return {definition.ref: definition}


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local, not installed package importable from a folder on sys.path."""
    name = f"localpkg_{uuid.uuid4().hex[:8]}"
    write(
        tmp_path / "proj",
        {
            f"{name}/__init__.py": "",
            f"{name}/steps.py": "from conveyor import step\n@step\ndef run() -> int:\n"
            "    return 7\n",
            f"{name}/sub/__init__.py": "",
            f"{name}/sub/tool.py": "from conveyor import step\n@step\ndef tool() -> int:\n"
            "    return 8\n",
            f"{name}/model.bin": b"\0" * 10,
            "outside.py": "",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def module_step(name: str) -> dict[str, StepDefinition]:
    definition = importlib.import_module(f"{name}.steps").run
    assert isinstance(definition, StepDefinition)
    return {definition.ref: definition}


def only(packed: dict[str, code_archive.ShippedStep]) -> code_archive.ShippedStep:
    (shipped,) = packed.values()
    return shipped


def test_a_script_ships_its_python_sources_and_nothing_else(tmp_path: Path) -> None:
    shipped = only(pack(script_project(tmp_path / "proj")))
    assert shipped.ref == "train.py:train"
    assert shipped.archive is not None
    assert shipped.archive.root == (tmp_path / "proj").resolve()
    assert shipped.archive.files == ("helper.py", "sub/util.py", "train.py")
    with zipfile.ZipFile(shipped.archive.path) as archive:
        assert archive.namelist() == ["helper.py", "sub/util.py", "train.py"]
        assert archive.read("helper.py") == b"VALUE = 1\n"


def test_a_module_of_a_local_package_ships_its_top_level_package(
    package: str, tmp_path: Path
) -> None:
    shipped = only(pack(module_step(package)))
    assert shipped.ref == f"{package}.steps:run"
    assert shipped.archive is not None
    assert shipped.archive.root == (tmp_path / "proj").resolve()
    assert shipped.archive.files == (
        f"{package}/__init__.py",
        f"{package}/steps.py",
        f"{package}/sub/__init__.py",
        f"{package}/sub/tool.py",
    )


def test_a_script_inside_a_package_ships_the_top_most_package(package: str, tmp_path: Path) -> None:
    definition = load_reference(f"{tmp_path / 'proj' / package / 'sub' / 'tool.py'}:tool")
    shipped = only(pack({definition.ref: definition}))
    assert shipped.ref == f"{package}/sub/tool.py:tool"
    assert shipped.archive is not None
    assert shipped.archive.root == (tmp_path / "proj").resolve()
    assert f"{package}/steps.py" in shipped.archive.files
    assert "outside.py" not in shipped.archive.files


def test_tests_is_a_local_package_and_conveyor_an_installed_one() -> None:
    from tests.unit import test_pipeline_build as local

    def body() -> int:
        return 1

    body.__module__ = "conveyor.workers.steps"  # as if the step came with conveyor itself
    installed = StepDefinition(body)
    packed = pack({local.source.ref: local.source, installed.ref: installed})
    assert packed[installed.ref] == code_archive.ShippedStep(installed.ref, None)
    shipped = packed[local.source.ref]
    assert shipped.ref == "tests.unit.test_pipeline_build:source"
    assert shipped.archive is not None
    assert "tests/unit/test_pipeline_build.py" in shipped.archive.files
    assert all(name.startswith("tests/") for name in shipped.archive.files)


def test_pyproject_adds_and_removes_files(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    write(
        root,
        {
            "pyproject.toml": '[tool.conveyor.code]\ninclude = ["*.yaml", "conf/*.json"]\n'
            'exclude = ["sub", "helper_*.py"]\n',
            "config.yaml": "a: 1\n",
            "deep/more.yaml": "b: 2\n",
            "conf/x.json": "{}",
            "other.json": "{}",
            "helper_old.py": "",
        },
    )
    shipped = only(pack(script_project(root)))
    assert shipped.archive is not None
    assert shipped.archive.files == (
        "conf/x.json",
        "config.yaml",
        "deep/more.yaml",
        "helper.py",
        "train.py",
    )


def test_the_nearest_pyproject_above_the_root_counts(tmp_path: Path) -> None:
    write(tmp_path, {"pyproject.toml": '[tool.conveyor.code]\ninclude = ["*.csv"]\n'})
    shipped = only(pack(script_project(tmp_path / "a" / "proj")))
    assert shipped.archive is not None
    assert "data.csv" in shipped.archive.files


def test_an_edited_pyproject_counts_from_the_next_pack(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    write(root, {"pyproject.toml": '[tool.conveyor.code]\ninclude = ["*.csv"]\n'})
    definitions = script_project(root)
    first = only(pack(definitions)).archive
    assert first is not None and "data.csv" in first.files
    # Same size, maybe the same timestamp: the parsed table is kept for an unchanged file.
    write(root, {"pyproject.toml": '[tool.conveyor.code]\ninclude = ["*.cfg"]\n'})
    os.utime(root / "pyproject.toml", ns=(1, 1))
    second = only(pack(definitions)).archive
    assert second is not None and "data.csv" not in second.files


def test_over_the_cap_the_error_says_what_to_exclude(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    write(
        root,
        {
            "pyproject.toml": "[tool.conveyor.code]\nmax_size_mb = 0.5\n",
            "big_table.py": "x = 1\n" * 200_000,
        },
    )
    with pytest.raises(ConveyorError) as caught:
        pack(script_project(root))
    message = str(caught.value)
    assert str(root.resolve()) in message
    assert "1.1 MB" in message
    assert "max_size_mb = 0.5" in message
    assert "big_table.py" in message
    assert "exclude = [" in message
    assert str(root / "pyproject.toml") in message


def test_a_bad_config_names_its_file(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    write(root, {"pyproject.toml": "[tool.conveyor.code]\nmax_size_mb = -1\nincludes = []\n"})
    with pytest.raises(ConveyorError, match=r"pyproject.toml: max_size_mb: .*includes"):
        pack(script_project(root))


def test_the_same_source_gives_the_same_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    definitions = script_project(tmp_path / "proj")
    first = only(pack(definitions)).archive
    assert first is not None
    # Unchanged: the process does not zip again.
    monkeypatch.setattr(code_archive, "_write_zip", _forbidden)
    assert only(pack(definitions)).archive is first
    monkeypatch.undo()
    # Zipped afresh (another process, say), the bytes are the same.
    monkeypatch.setattr(code_archive, "_packed", {})
    again = only(pack(definitions)).archive
    assert again is not None
    assert again.digest == first.digest
    # A copy of the tree elsewhere, with other times, too.
    copy = tmp_path / "copy"
    write(copy, {"train.py": STEP_SCRIPT, "helper.py": "VALUE = 1\n", "sub/util.py": "X = 1\n"})
    os.utime(copy / "helper.py", (1_000_000, 1_000_000))
    moved = only(pack(script_project(copy))).archive
    assert moved is not None
    assert moved.digest == first.digest


def test_an_edit_gives_a_new_digest(tmp_path: Path) -> None:
    definitions = script_project(tmp_path / "proj")
    first = only(pack(definitions)).archive
    assert first is not None
    (tmp_path / "proj" / "helper.py").write_text("VALUE = 2\n")
    os.utime(tmp_path / "proj" / "helper.py", ns=(first_mtime(first) + 10**9,) * 2)
    edited = only(pack(definitions)).archive
    assert edited is not None
    assert edited.digest != first.digest
    with zipfile.ZipFile(edited.path) as archive:
        assert archive.read("helper.py") == b"VALUE = 2\n"
    (tmp_path / "proj" / "new.py").write_text("")
    added = only(pack(definitions)).archive
    assert added is not None
    assert "new.py" in added.files


def first_mtime(archive: code_archive.CodeArchive) -> int:
    return (archive.root / "helper.py").stat().st_mtime_ns


def _forbidden(*args: object) -> None:
    raise AssertionError("zipped again")


def test_attach_code_uploads_one_archive_per_root(
    tmp_path: Path, store: LocalArtifactStore, package: str
) -> None:
    root = tmp_path / "proj2"
    write(root, {"train.py": STEP_SCRIPT, "helper.py": "VALUE = 1\n"})
    train = load_reference(f"{root / 'train.py'}:train")
    local = importlib.import_module(f"{package}.steps").run

    def body() -> int:
        return 1

    body.__module__ = "conveyor.workers.steps"
    installed = StepDefinition(body)

    @pipeline
    def p() -> None:
        train()
        train()
        local()
        installed()

    spec, definitions = p.compile()
    attached = attach_code(spec, definitions, store)
    first, second, third, fourth = attached.steps
    assert (first.ref, second.ref) == ("train.py:train", "train.py:train")
    assert first.code is not None
    assert second.code == first.code
    assert third.ref == f"{package}.steps:run"
    assert third.code is not None
    assert third.code != first.code
    assert fourth.ref == installed.ref
    assert fourth.code is None
    zipped = store.get(first.code.uri, first.code.digest, zip_names)
    assert zipped == ["helper.py", "train.py"]
    assert [s.name for s in attached.steps] == [s.name for s in spec.steps]


class PuttingStore(LocalArtifactStore):
    """A local store that counts what is put into it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts = 0

    def put(self, write: Callable[[str], str | None]) -> BlobRef:
        self.puts += 1
        return super().put(write)


def one_step_spec(definitions: dict[str, StepDefinition]) -> PipelineSpec:
    (train,) = definitions.values()

    @pipeline
    def p() -> None:
        train()

    return p.compile()[0]


def test_an_unchanged_archive_is_stored_once_per_store(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    definitions = script_project(root)
    spec = one_step_spec(definitions)
    store = PuttingStore(tmp_path / "store")
    first = attach_code(spec, definitions, store)
    again = attach_code(spec, definitions, store)
    assert store.puts == 1
    assert again.steps[0].code == first.steps[0].code
    other = PuttingStore(tmp_path / "other-store")
    assert attach_code(spec, definitions, other).steps[0].code is not None
    assert other.puts == 1
    write(root, {"helper.py": "VALUE = 22\n"})
    edited = attach_code(spec, definitions, store)
    assert store.puts == 2
    assert edited.steps[0].code != first.steps[0].code


def test_a_stored_archive_is_stored_again_after_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store may lose what it held (an expiry rule) while a server runs for weeks."""
    definitions = script_project(tmp_path / "proj")
    spec = one_step_spec(definitions)
    store = PuttingStore(tmp_path / "store")
    attach_code(spec, definitions, store)
    monkeypatch.setattr(code_archive, "STORED_FOR_S", 0.0)  # the while has passed
    attach_code(spec, definitions, store)
    assert store.puts == 2


def zip_names(path: str) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_a_step_without_a_source_file_is_an_error_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notebook = types.ModuleType(f"conveyor_user_notebook_{uuid.uuid4().hex[:8]}")
    monkeypatch.setitem(sys.modules, notebook.__name__, notebook)

    def cell() -> int:
        return 1

    cell.__module__ = notebook.__name__
    definition = StepDefinition(cell)
    with pytest.raises(ConveyorError, match="has no source file to ship"):
        pack({"cell": definition})
    assert pack({"cell": definition}, strict=False) == {
        "cell": code_archive.ShippedStep("cell", None)
    }


def test_steps_typed_into_a_notebook_ship_as_one_generated_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notebook = types.ModuleType("__main__")  # a kernel's has no file
    notebook.__dict__.update(
        cells("from conveyor import step\n@step(name='fit')\ndef train() -> int:\n    return 1\n")
    )
    monkeypatch.setitem(sys.modules, "__main__", notebook)
    definition = notebook.train
    shipped = only(pack({definition.ref: definition}))
    assert shipped.ref == "notebook_cells.py:train"
    assert shipped.archive is not None
    assert shipped.archive.files == ("notebook_cells.py",)
    with zipfile.ZipFile(shipped.archive.path) as archive:
        assert "def train() -> int:" in archive.read("notebook_cells.py").decode()
    # For workers of this process (the embedded stack), which have the definitions already.
    assert pack({definition.ref: definition}, strict=False) == {
        definition.ref: code_archive.ShippedStep(definition.ref, None)
    }


@pytest.mark.parametrize("module", ["__main__", "conveyor_user_0123456789ab"])
def test_a_trusted_class_of_a_pipeline_file_is_also_named_by_its_path_in_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    # @step(trust=[Doubler]) in a script that ships inside a package: a worker loads the
    # file under a name of its own, and finds the class by the file's path in the code.
    script = tmp_path / "pkg" / "flows" / "mk.py"
    script.parent.mkdir(parents=True)
    script.write_text("class Doubler: ...\n")
    monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(__file__=str(script)))
    archive = code_archive.CodeArchive(
        root=tmp_path, path=tmp_path / "code.zip", digest="blake3:00", size=0, files=()
    )
    trust = [f"{module}.Doubler", "sklearn.pipeline.Pipeline", f"{module}.Missing.Inner"]
    assert code_archive.trust_in_archive(trust, archive) == [
        *trust,
        "pkg/flows/mk.py:Doubler",
        "pkg/flows/mk.py:Missing.Inner",
    ]
    # A file outside the archive adds nothing (it is not in the run's code).
    outside = code_archive.CodeArchive(
        root=tmp_path / "elsewhere",
        path=tmp_path / "code.zip",
        digest="blake3:00",
        size=0,
        files=(),
    )
    assert code_archive.trust_in_archive(trust, outside) == trust
