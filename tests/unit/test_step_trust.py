"""What a worker runs: ``@step`` functions of the run's code archive or of trusted packages,
imported only after the reference passed every check, and nothing else."""

from __future__ import annotations

import shutil
import sys
import types
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from conveyor import pipeline, step
from conveyor.contracts import BlobRef, ConveyorError, StepSpec, UntrustedStep
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.code_archive import attach_code
from conveyor.workers.step_resolver import StepResolver, parse_reference
from conveyor.workers.steps import (
    FILE_MODULE_PREFIX,
    StepDefinition,
    importing_run_code,
    load_reference,
    readable,
)
from tests.unit import test_pipeline_build

T = TypeVar("T")

TRAIN = """\
from conveyor import step
import helper

@step
def train() -> int:
    return helper.VALUE
"""


class CountingStore(LocalArtifactStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        self.reads += 1
        return super().get(uri, digest, read)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


@pytest.fixture
def resolver(store: CountingStore, tmp_path: Path) -> StepResolver:
    return StepResolver(store, tmp_path / "code-cache")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file that hostile code would create when imported; it must never appear."""
    return tmp_path / "imported.marker"


@pytest.fixture
def unique() -> Iterator[str]:
    """A package name no other test uses; its modules leave sys.modules afterwards."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def archive(store: LocalArtifactStore, files: dict[str, str]) -> BlobRef:
    def write(path: str) -> None:
        with zipfile.ZipFile(path, "w") as zipped:
            for name, text in sorted(files.items()):
                zipped.writestr(name, text)

    return store.put(write)


def spec(ref: str, code: BlobRef | None = None) -> StepSpec:
    return StepSpec(name="s", ref=ref, code=code)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_step_runs_from_the_archive_whatever_the_working_directory(
    tmp_path: Path, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    write(project, {"jobs/train.py": TRAIN, "jobs/helper.py": "VALUE = 41\n"})
    client_step = load_reference(f"{project / 'jobs' / 'train.py'}:train")

    @pipeline
    def p() -> None:
        client_step()

    compiled, definitions = p.compile()
    attached = attach_code(compiled, definitions, store)
    # The worker: another folder, and the client's files are gone.
    shutil.rmtree(project)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    worker = StepResolver(store, tmp_path / "code-cache")
    definition = worker.resolve(attached.steps[0])
    assert attached.steps[0].ref == "train.py:train"
    assert definition is not client_step
    assert definition.fn() == 41
    assert worker.resolve(attached.steps[0]) is definition
    assert store.reads == 1


def test_two_versions_of_a_script_each_run_their_own(
    store: CountingStore, resolver: StepResolver, tmp_path: Path
) -> None:
    one = archive(store, {"train.py": TRAIN, "helper.py": "VALUE = 1\n"})
    two = archive(store, {"train.py": TRAIN, "helper.py": "VALUE = 2\n"})
    first = resolver.resolve(spec("train.py:train", one))
    second = resolver.resolve(spec("train.py:train", two))
    assert (first.fn(), second.fn()) == (1, 2)
    # Another resolver of the same process imports the first version again: still its own.
    again = StepResolver(store, tmp_path / "code-cache").resolve(spec("train.py:train", one))
    assert again.fn() == 1
    assert second.fn() == 2


def test_two_versions_of_a_package_each_run_their_own(
    store: CountingStore, resolver: StepResolver, unique: str, tmp_path: Path
) -> None:
    def version(value: int) -> BlobRef:
        return archive(
            store,
            {
                f"{unique}/__init__.py": "",
                f"{unique}/values.py": f"VALUE = {value}\n",
                f"{unique}/steps.py": f"from conveyor import step\nfrom {unique}.values import "
                "VALUE\n@step\ndef run() -> int:\n    return VALUE\n",
            },
        )

    one, two = version(1), version(2)
    ref = f"{unique}.steps:run"
    assert resolver.resolve(spec(ref, one)).fn() == 1
    assert resolver.resolve(spec(ref, two)).fn() == 2
    assert StepResolver(store, tmp_path / "code-cache").resolve(spec(ref, one)).fn() == 1
    assert resolver.resolve(spec(ref, two)).fn() == 2


@pytest.fixture
def hostile(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch, unique: str) -> str:
    """Hostile code within reach of a careless import: a package on sys.path and files near
    the working directory, each creating the marker when imported."""
    payload = f"open({str(marker)!r}, 'w').close()\ndef f(): pass\n"
    write(tmp_path / "path_entry", {f"{unique}/__init__.py": payload, f"{unique}/sub.py": payload})
    monkeypatch.syspath_prepend(str(tmp_path / "path_entry"))
    write(tmp_path, {"x.py": payload, "a/b/x.py": payload})
    monkeypatch.chdir(tmp_path / "a" / "b")
    return unique


STEPS_MODULE = """\
from conveyor import step

def plain() -> int:
    return 1

@step
def real() -> int:
    return 2
"""


@pytest.mark.parametrize(
    ("ref", "shipped", "why"),
    [
        ("os:system", False, "comes with no code archive and 'os' is not a trusted package"),
        (
            "os:system",
            True,
            "is not in the run's code archive and 'os' is not a trusted package",
        ),
        ("subprocess:run", False, "'subprocess' is not a trusted package"),
        ("subprocess:run", True, "'subprocess' is not a trusted package"),
        ("../../x.py:f", True, "climbs out"),
        ("../../x.py:f", False, "climbs out"),
        ("/etc/x.py:f", True, "absolute"),
        ("{tmp}/x.py:f", True, "absolute"),
        ("x.py:f", False, "the run has no code archive"),
        ("x.py:f", True, "not in the run's code archive"),
        ("{pkg}:f", False, "is not a trusted package"),
        ("{pkg}.sub:f", True, "is not in the run's code archive"),
        ("steps_mod:missing", True, "steps_mod defines no 'missing'"),
        ("steps_mod:plain", True, "is a function, not a @step"),
        ("steps_mod:real.__globals__", True, "special attribute"),
        ("steps_mod", True, "no ':'"),
        ("steps_mod:real:x", True, "more than one ':'"),
        ("steps mod:real", True, "not a Python identifier"),
        ("sub\\x.py:f", True, "backslash"),
        ("x.txt/y:f", True, "names a .py file"),
        (".hidden/x.py:f", True, "not a plain file or folder name"),
    ],
)
def test_a_worker_refuses_what_it_does_not_trust(
    ref: str,
    shipped: bool,
    why: str,
    hostile: str,
    marker: Path,
    store: CountingStore,
    resolver: StepResolver,
    tmp_path: Path,
) -> None:
    code = archive(store, {"steps_mod.py": STEPS_MODULE}) if shipped else None
    ref = ref.replace("{tmp}", str(tmp_path)).replace("{pkg}", hostile)
    with pytest.raises(UntrustedStep, match=why.replace("(", r"\(")):
        resolver.resolve(spec(ref, code))
    assert not marker.exists()
    assert hostile not in sys.modules


def test_an_overlong_reference_is_refused_before_anything_else() -> None:
    # StepSpec bounds it too; the resolver does not rely on every caller building one.
    with pytest.raises(UntrustedStep, match="longer than 1000"):
        parse_reference("m" * 1001 + ":f")


def test_nothing_is_parsed_into_a_path_that_leaves_the_archive() -> None:
    parsed = parse_reference("jobs/train-2.py:Trainer.fit")
    assert (parsed.module, parsed.qualname, parsed.is_file) == (
        "jobs/train-2.py",
        "Trainer.fit",
        True,
    )
    assert parse_reference("a.b.c:run").top == "a"


def test_a_step_of_the_archive_runs_and_the_rest_of_it_stays_data(
    store: CountingStore, resolver: StepResolver
) -> None:
    code = archive(store, {"steps_mod.py": STEPS_MODULE})
    assert resolver.resolve(spec("steps_mod:real", code)).fn() == 2


def test_a_package_of_the_worker_is_not_replaced_by_one_of_the_archive(
    store: CountingStore, resolver: StepResolver, marker: Path
) -> None:
    code = archive(
        store, {"json/__init__.py": f"open({str(marker)!r}, 'w').close()\n", "other.py": ""}
    )
    with pytest.raises(UntrustedStep, match="already imported another 'json'"):
        resolver.resolve(spec("json:dumps", code))
    assert not marker.exists()
    import json

    assert sys.modules["json"] is json


def test_a_trusted_package_runs_without_an_archive() -> None:
    resolver = StepResolver(trusted=("tests",))
    found = resolver.resolve(spec("tests.unit.test_pipeline_build:source"))
    assert found is test_pipeline_build.source


def test_a_trusted_package_elsewhere_on_sys_path_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique: str, store: CountingStore
) -> None:
    write(
        tmp_path / "site",
        {
            f"{unique}/__init__.py": "from conveyor import step\n@step\ndef f() -> int:\n"
            "    return 5\n"
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    resolver = StepResolver(store, tmp_path / "cache", trusted=(unique,))
    assert resolver.resolve(spec(f"{unique}:f")).fn() == 5
    # Named with an archive that does not hold it, it still comes from the trusted package.
    code = archive(store, {"other.py": ""})
    assert resolver.resolve(spec(f"{unique}:f", code)).fn() == 5


def test_a_trusted_package_still_runs_only_steps() -> None:
    resolver = StepResolver(trusted=("tests",))
    with pytest.raises(UntrustedStep, match="not a @step"):
        resolver.resolve(spec("tests.unit.test_step_trust:write"))


def test_definitions_of_this_process_resolve_as_they_are(
    tmp_path: Path, store: CountingStore
) -> None:
    write(tmp_path / "project", {"train.py": TRAIN, "helper.py": "VALUE = 3\n"})
    script_step = load_reference(f"{tmp_path / 'project' / 'train.py'}:train")

    @step
    def nested() -> int:
        return 4

    @pipeline
    def p() -> None:
        script_step()
        nested()

    compiled, definitions = p.compile()
    attached = attach_code(compiled, definitions, store)
    resolver = StepResolver(store, tmp_path / "cache")
    resolver.add(definitions)
    assert [resolver.resolve(s) for s in attached.steps] == [script_step, nested]
    assert store.reads == 0


def test_an_archive_that_fails_to_import_says_so(
    store: CountingStore, resolver: StepResolver
) -> None:
    code = archive(store, {"broken.py": "raise RuntimeError('no GPU here')\n"})
    with pytest.raises(ConveyorError, match="cannot import 'broken:f': RuntimeError: no GPU"):
        resolver.resolve(spec("broken:f", code))


def test_a_worker_without_a_store_cannot_fetch_code(store: CountingStore) -> None:
    code = archive(store, {"steps_mod.py": STEPS_MODULE})
    with pytest.raises(ConveyorError, match="no artifact store"):
        StepResolver().resolve(spec("steps_mod:real", code))


def test_trusted_names_are_top_level_packages() -> None:
    with pytest.raises(ConveyorError, match="not a top-level package name"):
        StepResolver(trusted=("a.b",))


def test_step_definitions_are_still_what_the_decorator_makes() -> None:
    assert isinstance(test_pipeline_build.source, StepDefinition)


def test_a_module_of_this_process_does_not_hide_the_archive_s_namesake(
    store: CountingStore, resolver: StepResolver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = types.ModuleType("helper")
    local.__file__ = str(tmp_path / "elsewhere" / "helper.py")
    setattr(local, "VALUE", 99)  # noqa: B010 (a module of this process, set up by hand)
    monkeypatch.setitem(sys.modules, "helper", local)
    code = archive(store, {"train.py": TRAIN, "helper.py": "VALUE = 1\n"})
    assert resolver.resolve(spec("train.py:train", code)).fn() == 1
    assert sys.modules["helper"] is local


def test_a_module_imported_inside_a_step_body_is_found_in_the_run_archive(
    store: CountingStore, resolver: StepResolver, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    late = f"{unique}_late"
    body = f"from conveyor import step\n\n@step\ndef train() -> int:\n    import {late}\n"
    body += f"    return {late}.VALUE\n"
    code = archive(store, {"train.py": body, f"{late}.py": "VALUE = 7\n"})
    monkeypatch.chdir(store.root.parent)
    step_spec = spec("train.py:train", code)
    definition = resolver.resolve(step_spec)
    try:
        # Outside a running step the archive is not on the import path...
        with pytest.raises(ModuleNotFoundError):
            definition.fn()
        # ...inside one, the step's own archive is.
        with resolver.running(step_spec):
            assert definition.fn() == 7
    finally:
        sys.modules.pop(late, None)


def test_a_step_of_an_archive_is_named_by_its_file_in_messages(
    store: CountingStore, resolver: StepResolver
) -> None:
    code = archive(store, {"jobs/train.py": TRAIN, "jobs/helper.py": "VALUE = 1\n"})
    definition = resolver.resolve(spec("jobs/train.py:train", code))
    generated = definition.fn.__module__
    assert generated.startswith(FILE_MODULE_PREFIX)
    assert readable(f"module {generated!r} has no attribute 'x'") == (
        "module 'jobs/train.py' has no attribute 'x'"
    )


CALLS_ITS_PIPELINE = """\
from conveyor import pipeline, step

@step
def one() -> int:
    return 1

@pipeline
def p() -> None:
    one()

p()
"""


def test_a_file_that_runs_its_pipeline_when_imported_is_refused_and_nothing_stays_set(
    store: CountingStore, resolver: StepResolver
) -> None:
    code = archive(store, {"flow.py": CALLS_ITS_PIPELINE})
    for _ in range(2):  # not imported, so tried again the next time, with the same answer
        with pytest.raises(ConveyorError, match=r"flow\.py starts a run when it is imported"):
            resolver.resolve(spec("flow.py:one", code))
    assert importing_run_code.get() is None
