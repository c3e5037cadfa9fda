"""Code that travels with a run: the client packs its steps' source, a worker unpacks it.

Workers share nothing with the client but the broker and the artifact store, so a run carries
the source of its steps as a zip in the artifact store, named by its content. The client side
(``pack``, ``attach_code``) zips each code root once per change; the worker side (``CodeCache``)
fetches an archive once per digest and extracts it, refusing anything that could write outside
its directory, for ``steps.StepResolver`` to import from.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pydantic

from conveyor.contracts import (
    ArtifactStore,
    BlobRef,
    ConveyorError,
    PipelineSpec,
)
from conveyor.workers import digests
from conveyor.workers.notebook_code import MODULE_FILE as CELLS_FILE
from conveyor.workers.notebook_code import cell_module
from conveyor.workers.steps import StepDefinition, is_script_module


@functools.cache
def installed_packages() -> frozenset[str]:
    """Top-level packages of the distributions installed here (editable installs count)."""
    return frozenset(packages_distributions())


DEFAULT_MAX_SIZE_MB = 20.0
"""How much source a code root may ship, unless its pyproject.toml says otherwise."""

# Never shipped, whatever the globs say: environments, caches, other tools' trees.
_NEVER_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
# Fixed metadata, so that the same source gives the same bytes, hence the same digest.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_ZIP_MODE = (stat.S_IFREG | 0o644) << 16
_ZIP_UNIX = 3
_CHUNK = 1 << 20


# --- Configuration: [tool.conveyor.code] ---------------------------------------------------


class _CodeTable(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    include: list[str] = pydantic.Field(default_factory=list)
    exclude: list[str] = pydantic.Field(default_factory=list)
    max_size_mb: float = pydantic.Field(default=DEFAULT_MAX_SIZE_MB, gt=0)


@dataclass(frozen=True)
class CodeConfig:
    """What a code root ships beyond its ``*.py`` files, what it leaves out, and its cap.

    Globs are shell-style and match a path relative to the code root (``*`` crosses ``/``);
    a glob without ``/`` also matches a file or folder name at any depth.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_size_mb: float = DEFAULT_MAX_SIZE_MB
    pyproject: Path | None = None


def _nearest_pyproject(root: Path) -> Path | None:
    for folder in (root, *root.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


_configs: dict[Path, tuple[tuple[int, int], CodeConfig]] = {}
_configs_lock = threading.Lock()


def read_config(root: Path) -> CodeConfig:
    """``[tool.conveyor.code]`` of the nearest pyproject.toml at or above ``root``; parsed
    again only once the file changed (a project's pyproject.toml is long to parse next to
    the rest of a submit)."""
    pyproject = _nearest_pyproject(root)
    if pyproject is None:
        return CodeConfig()
    try:
        facts = os.stat(pyproject)
    except OSError as exc:
        raise ConveyorError(f"cannot read {pyproject}: {exc}") from None
    version = (facts.st_mtime_ns, facts.st_size)
    with _configs_lock:
        known = _configs.get(pyproject)
    if known is not None and known[0] == version:
        return known[1]
    config = _parse_config(pyproject)
    with _configs_lock:
        _configs[pyproject] = (version, config)
    return config


def _parse_config(pyproject: Path) -> CodeConfig:
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConveyorError(f"cannot read {pyproject}: {exc}") from None
    table: Any = data.get("tool", {}).get("conveyor", {}).get("code", {})
    try:
        parsed = _CodeTable.model_validate(table)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'table'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConveyorError(f"[tool.conveyor.code] in {pyproject}: {problems}") from None
    return CodeConfig(tuple(parsed.include), tuple(parsed.exclude), parsed.max_size_mb, pyproject)


# --- Client side: where a step's source is, and its archive --------------------------------


@dataclass(frozen=True)
class CodeArchive:
    """A zip of the source under one code root, kept in a local file until the process ends."""

    root: Path
    path: Path
    digest: str
    size: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class ShippedStep:
    """How one step travels: its reference inside ``archive``, or ``archive=None`` for a step
    of an installed package (workers import it from their own environment)."""

    ref: str
    archive: CodeArchive | None


@dataclass(frozen=True)
class _Source:
    root: Path
    members: frozenset[str] | None
    """Top-level packages or modules to ship; None: the whole directory."""
    ref: str


@dataclass(frozen=True)
class _File:
    name: str
    """Posix path inside the archive."""
    path: Path
    size: int
    mtime_ns: int


def _script_source(path: Path, qualname: str) -> _Source:
    folder = path.parent
    if not (folder / "__init__.py").is_file():
        return _Source(folder, None, f"{path.name}:{qualname}")
    # A script inside a package ships its top-most package, which it may import by name.
    top = folder
    while (top.parent / "__init__.py").is_file() and top.parent != top:
        top = top.parent
    relative = path.relative_to(top.parent).as_posix()
    return _Source(top.parent, frozenset({top.name}), f"{relative}:{qualname}")


def _module_source(name: str, path: Path, qualname: str) -> _Source:
    parts = name.split(".")
    is_package = path.name == "__init__.py"
    # The sys.path entry the module was imported from: as many folders up as the name is deep.
    levels = len(parts) if is_package else len(parts) - 1
    root = path.parents[min(levels, len(path.parents) - 1)]
    if is_package:
        expected = root.joinpath(*parts, "__init__.py")
    else:
        expected = root.joinpath(*parts[:-1], f"{parts[-1]}.py")
    if expected != path:
        raise ConveyorError(
            f"cannot tell which folder module {name!r} was imported from ({path}); "
            "ship it as a script or install its package on the workers"
        )
    return _Source(root, frozenset({parts[0]}), f"{name}:{qualname}")


def _typed_interactively(definition: StepDefinition) -> bool:
    """Whether a step was typed into a notebook cell or an interactive interpreter: its
    module is ``__main__`` and has no file."""
    module = definition.fn.__module__
    return module == "__main__" and getattr(sys.modules.get(module), "__file__", None) is None


def _cell_sources(typed: Mapping[str, StepDefinition]) -> dict[str, _Source]:
    """Steps typed into notebook cells: one generated module, in a code root of its own."""
    module = cell_module(typed.values(), vars(sys.modules["__main__"]), installed_packages())
    root = _archive_folder() / f"cells-{module.digest[:16]}"
    path = root / CELLS_FILE
    if not path.is_file():
        root.mkdir(exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=root, suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(module.source)
        os.replace(staged, path)
    return {
        ref: _Source(root, None, f"{CELLS_FILE}:{d.fn.__qualname__}") for ref, d in typed.items()
    }


def _locate(ref: str, definition: StepDefinition) -> _Source | None:
    """Where the source of ``definition`` is; None for a step of an installed package."""
    fn = definition.fn
    module_name = fn.__module__
    filename = getattr(sys.modules.get(module_name), "__file__", None)
    is_script = is_script_module(module_name)
    if not is_script and module_name.partition(".")[0] in installed_packages():
        return None
    if filename is None:
        raise ConveyorError(
            f"step {definition.name!r} ({ref}) has no source file to ship with the run: "
            "define it in a .py file"
        )
    path = Path(filename).resolve()
    if is_script:
        return _script_source(path, fn.__qualname__)
    return _module_source(module_name, path, fn.__qualname__)


def _matches(relative: str, patterns: tuple[str, ...]) -> bool:
    name = relative.rpartition("/")[2]
    return any(
        fnmatchcase(relative, pattern) or ("/" not in pattern and fnmatchcase(name, pattern))
        for pattern in patterns
    )


def _keep_dir(root: Path, folder: Path, config: CodeConfig) -> bool:
    name = folder.name
    if name.startswith(".") or name in _NEVER_DIRS or (folder / "pyvenv.cfg").exists():
        return False
    return not _matches(folder.relative_to(root).as_posix(), config.exclude)


def _file_entry(root: Path, path: Path, config: CodeConfig) -> _File | None:
    relative = path.relative_to(root).as_posix()
    if path.name.startswith("."):
        return None
    if not path.name.endswith(".py") and not _matches(relative, config.include):
        return None
    if _matches(relative, config.exclude):
        return None
    try:
        info = path.stat()
    except OSError:  # a dangling symbolic link
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return _File(relative, path, info.st_size, info.st_mtime_ns)


def _walk(root: Path, top: Path, config: CodeConfig) -> Iterator[_File]:
    for folder_text, folders, names in os.walk(top):
        folder = Path(folder_text)
        folders[:] = [name for name in folders if _keep_dir(root, folder / name, config)]
        for name in names:
            entry = _file_entry(root, folder / name, config)
            if entry is not None:
                yield entry


def _select(root: Path, members: frozenset[str] | None, config: CodeConfig) -> list[_File]:
    found: list[_File] = []
    if members is None:
        found.extend(_walk(root, root, config))
    for member in sorted(members or ()):
        if (root / member).is_dir():
            found.extend(_walk(root, root / member, config))
        entry = _file_entry(root, root / f"{member}.py", config)
        if entry is not None:
            found.append(entry)
    return sorted(found, key=lambda entry: entry.name)


def megabytes(size: float) -> str:
    return f"{size / (1 << 20):.1f} MB"


def _check_size(root: Path, files: list[_File], config: CodeConfig) -> None:
    cap = config.max_size_mb * (1 << 20)
    total = sum(entry.size for entry in files)
    if total <= cap:
        return
    largest = sorted(files, key=lambda entry: entry.size, reverse=True)[:3]
    where = config.pyproject or root / "pyproject.toml"
    raise ConveyorError(
        f"the code under {root} to ship with the run is {megabytes(total)}, over the cap of "
        f"max_size_mb = {config.max_size_mb:g} (largest: "
        f"{', '.join(f'{e.name} {megabytes(e.size)}' for e in largest)}); leave out what the "
        f'steps do not need with exclude = ["pattern", ...] under [tool.conveyor.code] in '
        f"{where}, or raise max_size_mb there"
    )


def _write_zip(path: str, files: list[_File]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in files:
            info = zipfile.ZipInfo(entry.name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = _ZIP_UNIX  # whatever the client's OS: same source, same bytes
            info.external_attr = _ZIP_MODE
            info.file_size = entry.size
            with entry.path.open("rb") as source, archive.open(info, "w") as target:
                shutil.copyfileobj(source, target, _CHUNK)


_state_lock = threading.Lock()
_workdir: Path | None = None
_packed: dict[tuple[Path, frozenset[str] | None], tuple[tuple[Any, ...], CodeArchive]] = {}
_roots: dict[str, Path] = {}


def _archive_folder() -> Path:
    global _workdir
    with _state_lock:
        if _workdir is None:
            _workdir = Path(tempfile.mkdtemp(prefix="conveyor-code-"))
            atexit.register(shutil.rmtree, _workdir, True)
        return _workdir


def _build(root: Path, files: list[_File]) -> CodeArchive:
    folder = _archive_folder()
    handle, staged = tempfile.mkstemp(dir=folder, suffix=".zip.tmp")
    os.close(handle)
    try:
        _write_zip(staged, files)
        digest, size = digests.of_file(staged)
        # Named by content, and never deleted while the process lives: an upload in another
        # thread may still read an archive that an edit has since superseded.
        path = folder / f"{digest.partition(':')[2]}.zip"
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return CodeArchive(root, path, digest, size, tuple(entry.name for entry in files))


def _archive(root: Path, members: frozenset[str] | None) -> CodeArchive:
    config = read_config(root)
    files = _select(root, members, config)
    _check_size(root, files, config)
    # Listing and stat-ing the tree is cheap next to zipping and hashing it.
    fingerprint = tuple((entry.name, entry.size, entry.mtime_ns) for entry in files)
    key = (root, members)
    with _state_lock:
        cached = _packed.get(key)
    # The file may be gone if something cleans the temporary folder under a long process.
    if cached is not None and cached[0] == fingerprint and cached[1].path.is_file():
        return cached[1]
    archive = _build(root, files)
    with _state_lock:
        _packed[key] = (fingerprint, archive)
        _roots[archive.digest] = root
    return archive


def _merge(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    return None if a is None or b is None else a | b


def _locate_or_skip(ref: str, definition: StepDefinition, strict: bool) -> _Source | None:
    try:
        return _locate(ref, definition)
    except ConveyorError:
        if strict:
            raise
        return None


def pack(
    definitions: Mapping[str, StepDefinition], *, strict: bool = True
) -> dict[str, ShippedStep]:
    """How each step of a compiled pipeline travels, by its reference in ``definitions``.

    Steps of installed distributions ship nothing. A script ships its folder (or, inside a
    package, its top-most package); a module of a local package ships that top-level package
    from the sys.path entry it came from. Steps that share a root share one archive; an
    unchanged root is not zipped again in this process. Steps typed into notebook cells ship
    as one generated module (see ``notebook_code``). A step whose source cannot be found is a
    ConveyorError, or with ``strict=False`` ships nothing (nor does a cell step), for workers
    of this same process that know it already.
    """
    typed = {ref: d for ref, d in definitions.items() if _typed_interactively(d)}
    sources = {
        ref: None if ref in typed else _locate_or_skip(ref, d, strict)
        for ref, d in definitions.items()
    }
    if typed and strict:
        sources.update(_cell_sources(typed))
    members: dict[Path, frozenset[str] | None] = {}
    for found in filter(None, sources.values()):
        members[found.root] = _merge(members.get(found.root, frozenset()), found.members)
    archives = {root: _archive(root, chosen) for root, chosen in members.items()}
    shipped: dict[str, ShippedStep] = {}
    for ref, source in sources.items():
        if source is None:
            shipped[ref] = ShippedStep(ref, None)
        else:
            shipped[ref] = ShippedStep(source.ref, archives[source.root])
    return shipped


def packed_root(digest: str) -> Path | None:
    """The code root this process packed into the archive ``digest``, if it did."""
    with _state_lock:
        return _roots.get(digest)


STORED_FOR_S = 300.0
"""How long an archive this process stored is taken to be in its store still."""
_uploaded: dict[tuple[str, str], tuple[float, BlobRef]] = {}


def _upload(store: ArtifactStore, archive: CodeArchive) -> BlobRef:
    """``archive`` stored in ``store``, at most once per ``STORED_FOR_S`` in a process: the
    same digest names the same bytes, so a pipeline submitted again with unchanged code
    does not copy, hash, or send its archive again. Stored again after that, because a
    store may lose what it held (an S3 bucket's expiry rule, a cleaned directory) while a
    server runs for weeks; storing it again also renews its age for such a rule."""
    key = (store.location, archive.digest)
    with _state_lock:
        known = _uploaded.get(key)
    if known is not None and time.monotonic() - known[0] < STORED_FOR_S:
        return known[1]

    def write(path: str) -> None:
        shutil.copyfile(archive.path, path)

    blob = store.put(write)
    with _state_lock:
        # Under the store's digest too, should it hash with another algorithm than ours.
        _roots[blob.digest] = archive.root
        _uploaded[key] = (time.monotonic(), blob)
    return blob


def attach_code(
    spec: PipelineSpec,
    definitions: Mapping[str, StepDefinition],
    store: ArtifactStore,
    *,
    strict: bool = True,
) -> PipelineSpec:
    """``spec`` with each step's code archive uploaded to ``store`` and set on the step.

    File references become relative to their archive's root (``sub/script.py:fn``); module
    references stay; steps of installed packages keep ``code=None``. ``strict`` as in
    ``pack``. Blocking.
    """
    shipped = pack(definitions, strict=strict)
    blobs: dict[str, BlobRef] = {}
    steps = []
    for step in spec.steps:
        how = shipped.get(step.ref)
        if how is None:
            raise ConveyorError(f"step {step.name!r} ({step.ref}) has no definition to ship")
        code = None
        trust = step.trust
        if how.archive is not None:
            code = blobs.get(how.archive.digest)
            if code is None:
                code = blobs[how.archive.digest] = _upload(store, how.archive)
            trust = trust_in_archive(trust, how.archive)
        steps.append(step.model_copy(update={"ref": how.ref, "code": code, "trust": trust}))
    return spec.model_copy(update={"steps": steps})


def trust_in_archive(trust: list[str], archive: CodeArchive) -> list[str]:
    """``trust`` with each class of a pipeline file of ``archive`` (``@step(trust=[Doubler])``
    in a script: ``__main__.Doubler``) also named as a worker finds it, by its file's path in
    the archive (``mk.py:Doubler``): the module has another name on every worker."""
    found = list(trust)
    for name in trust:
        # A pipeline file's module name has no dot: what follows the first is the class's.
        module, _, qualname = name.partition(".")
        if not is_script_module(module):
            continue
        file = getattr(sys.modules.get(module), "__file__", None)
        if file is None:
            continue
        inside = Path(file).resolve()
        if inside.is_relative_to(archive.root):
            shipped = f"{inside.relative_to(archive.root).as_posix()}:{qualname}"
            if shipped not in found:
                found.append(shipped)
    return found
