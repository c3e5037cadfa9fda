"""What a worker runs: checks a StepSpec's reference, then finds its ``@step`` definition.

A worker runs only ``@step`` functions of the run's code archive (see ``code_archive``) or of
installed packages it trusts: a message is data, never an instruction to import arbitrary
code. Every check happens before anything is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import stat
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.contracts import (
    ArtifactStore,
    BlobRef,
    ConveyorError,
    StepSpec,
    UntrustedStep,
)
from conveyor.workers.code_archive import installed_packages, packed_root
from conveyor.workers.code_cache import CodeCache, default_cache_dir
from conveyor.workers.script_classes import (
    USERS_FILES,
    ArchiveFiles,
    CodeAtHand,
    NoCode,
    archive_module_name,
)
from conveyor.workers.steps import (
    SHOWN_FILE,
    StepDefinition,
    importing_run_code,
    load_reference,
    script_file,
)

MAX_REF_LENGTH = 1000
"""The longest reference a worker reads (the bound of ``StepSpec.ref``)."""
MAX_REF_PARTS = 32
"""The most dotted names or path segments in a reference."""

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A file or directory name: no leading dot (so no '.', '..', or hidden directory), no separator.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_REF_HELP = "use package.module:function, or path/to/file.py:function inside the code archive"


@dataclass(frozen=True)
class StepReference:
    """A reference that passed the worker's checks: nothing in it can point outside."""

    module: str
    """A dotted module name, or a relative posix path that ends in ``.py``."""
    qualname: str
    is_file: bool

    @property
    def top(self) -> str:
        """The top-level package of a module reference."""
        return self.module.partition(".")[0]


def _malformed(ref: str, why: str) -> UntrustedStep:
    shown = ref if len(ref) <= 200 else ref[:200] + "..."
    return UntrustedStep(f"{shown!r} is not a step reference: {why}; {_REF_HELP}")


def _check_names(ref: str, names: list[str], what: str) -> None:
    if len(names) > MAX_REF_PARTS:
        raise _malformed(ref, f"the {what} has more than {MAX_REF_PARTS} parts")
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            raise _malformed(ref, f"{name!r} in the {what} is not a Python identifier")
        if what == "function name" and name.startswith("__") and name.endswith("__"):
            raise _malformed(ref, f"{name!r} in the function name is a special attribute")


def _check_path(ref: str, path: str) -> None:
    if "\\" in path:
        raise _malformed(ref, "the path has a backslash; separate directories with '/'")
    if path.startswith("/"):
        raise _malformed(ref, "the path is absolute")
    if not path.endswith(".py"):
        raise _malformed(ref, "a file reference names a .py file")
    segments = path.split("/")
    if len(segments) > MAX_REF_PARTS:
        raise _malformed(ref, f"the path has more than {MAX_REF_PARTS} parts")
    for segment in segments:
        if segment == "..":
            raise _malformed(ref, "the path climbs out with '..'")
        if not _PATH_SEGMENT.fullmatch(segment):
            raise _malformed(ref, f"{segment!r} in the path is not a plain file or folder name")


def parse_reference(ref: str) -> StepReference:
    """Check the shape of a reference that came in a message; UntrustedStep says what is wrong.

    Only the text is read: nothing is imported and no file is touched.
    """
    if len(ref) > MAX_REF_LENGTH:
        raise _malformed(ref, f"it is longer than {MAX_REF_LENGTH} characters")
    module, sep, qualname = ref.rpartition(":")
    if not sep or not module or not qualname:
        raise _malformed(ref, "it has no ':' between module and function")
    if ":" in module:
        raise _malformed(ref, "it has more than one ':'")
    _check_names(ref, qualname.split("."), "function name")
    if module.endswith(".py") or "/" in module or "\\" in module:
        _check_path(ref, module)
        return StepReference(module, qualname, is_file=True)
    _check_names(ref, module.split("."), "module name")
    return StepReference(module, qualname, is_file=False)


def _source_file(fn: Callable[..., Any]) -> str | None:
    """The file of a function defined in a script or a file loaded by path, else None."""
    path = script_file(fn.__module__)
    return None if path is None else str(path)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _in_archive(root: Path, ref: StepReference) -> bool:
    """Whether the archive extracted at ``root`` holds the file or module ``ref`` names."""
    if ref.is_file:
        return _is_regular_file(root.joinpath(*ref.module.split("/")))
    base = root.joinpath(*ref.module.split("."))
    return _is_regular_file(base.parent / f"{base.name}.py") or _is_regular_file(
        base / "__init__.py"
    )


def _comes_from(module: types.ModuleType, root: str) -> bool:
    """Whether ``module`` was loaded from under ``root`` (namespace packages by their path)."""
    filename = getattr(module, "__file__", None)
    places = [filename] if filename else list(getattr(module, "__path__", []))
    prefix = root.rstrip(os.sep) + os.sep
    return bool(places) and all(str(place).startswith(prefix) for place in places)


def _top_level_names(folder: str) -> set[str]:
    """The names ``import`` finds in ``folder``: its modules and its folders."""
    names: set[str] = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".py"):
                names.add(entry.name[:-3])
            elif entry.is_dir(follow_symlinks=False):
                names.add(entry.name)
    return names


def _of_environment(top: str) -> bool:
    """Whether ``top`` belongs to the process's environment rather than to some user's code."""
    return (
        top == "__main__"
        or top in sys.stdlib_module_names
        or top in sys.builtin_module_names
        or top in installed_packages()
    )


def _exec_file(name: str, path: Path, shown: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConveyorError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    setattr(module, SHOWN_FILE, shown)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class _ArchiveImports:
    """Imports from extracted code archives without two archives seeing each other's modules.

    ``sys.path`` and ``sys.modules`` belong to the whole process, so imports from archives take
    one lock, and an archive's root is on ``sys.path`` only while its modules are imported.
    Modules an archive brought keep their names in ``sys.modules`` (pickle finds their classes
    there) until another archive needs those names: they are then set aside, and put back when
    their own archive imports again. The process's own namesakes from local folders (a script
    it loaded, say) step aside only while an archive imports; those of its environment (the
    standard library, installed packages) never do. Functions already resolved keep their
    globals either way.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._origin: dict[str, str] = {}
        """Module name -> the root of the archive it was imported from."""
        self._aside: dict[str, dict[str, types.ModuleType]] = {}
        """Archive root -> its modules that another archive displaced."""

    def file(self, root: Path, digest: str, path: str) -> types.ModuleType:
        """The module of the file ``path`` (posix, relative) of the archive at ``root``."""
        name = archive_module_name(digest, path)
        location = root.joinpath(*path.split("/"))
        # Scripts import their siblings the way `python script.py` would let them.
        folders = [str(root)]
        if location.parent != root:
            folders.append(str(location.parent))
        with self._lock:
            module = sys.modules.get(name)
            if module is not None:
                return module
            with self._importing(str(root), folders, path):
                return _exec_file(name, location, path)

    def module(self, root: Path, name: str) -> types.ModuleType:
        """The module ``name`` of the archive at ``root``."""
        top = name.partition(".")[0]
        with self._lock, self._importing(str(root), [str(root)], name):
            current = sys.modules.get(top)
            if current is not None and self._origin.get(top) != str(root):
                where = getattr(current, "__file__", None) or "built in"
                raise UntrustedStep(
                    f"the run's code archive has a package {top!r}, but this worker already "
                    f"imported another {top!r} ({where}); rename that package of the pipeline"
                )
            module = importlib.import_module(name)
        if not _comes_from(module, str(root)):
            raise UntrustedStep(f"module {name!r} did not come from the run's code archive")
        return module

    def trusted(self, name: str) -> types.ModuleType:
        """The module ``name`` of a trusted package, as this worker's environment has it."""
        with self._lock:
            self._set_aside({name.partition(".")[0]}, keep=None)
            return importlib.import_module(name)

    @contextlib.contextmanager
    def _importing(self, root: str, folders: list[str], what: str) -> Iterator[None]:
        provided = set().union(*(_top_level_names(folder) for folder in folders))
        self._set_aside(provided, keep=root)
        host = self._displace_host(provided)
        self._restore(root, provided)
        before = set(sys.modules)
        sys.path[:0] = folders
        token = importing_run_code.set(what)
        try:
            yield
        finally:
            importing_run_code.reset(token)
            for folder in folders:
                with contextlib.suppress(ValueError):
                    sys.path.remove(folder)
            self._claim(root, set(sys.modules) - before)
            self._reinstate(host)

    def _displace_host(self, names: set[str]) -> dict[str, types.ModuleType]:
        """Take out of the way the process's own modules of those names that come from some
        local folder (a script's sibling, a local package): the archive has its own."""
        host: dict[str, types.ModuleType] = {}
        for module_name in list(sys.modules):
            top = module_name.partition(".")[0]
            if top in names and module_name not in self._origin and not _of_environment(top):
                host[module_name] = sys.modules.pop(module_name)
        return host

    def _reinstate(self, host: dict[str, types.ModuleType]) -> None:
        # The process's own modules get their names back; the archive's namesakes wait aside.
        if host:
            self._set_aside({name.partition(".")[0] for name in host}, keep=None)
            sys.modules.update(host)

    def _set_aside(self, names: set[str], keep: str | None) -> None:
        for module_name, origin in list(self._origin.items()):
            if origin == keep or module_name.partition(".")[0] not in names:
                continue
            del self._origin[module_name]
            module = sys.modules.pop(module_name, None)
            if module is not None:
                self._aside.setdefault(origin, {})[module_name] = module

    def _restore(self, root: str, names: set[str]) -> None:
        aside = self._aside.get(root, {})
        for module_name in [m for m in aside if m.partition(".")[0] in names]:
            module = aside.pop(module_name)
            if module_name not in sys.modules:
                sys.modules[module_name] = module
                self._origin[module_name] = root

    def _claim(self, root: str, names: Iterable[str]) -> None:
        for module_name in names:
            module = sys.modules.get(module_name)
            if module is not None and _comes_from(module, root):
                self._origin[module_name] = root


_IMPORTS = _ArchiveImports()

_running_from: ContextVar[str | None] = ContextVar("conveyor_running_from", default=None)


class _LateImports(importlib.abc.MetaPathFinder):
    """Finds a top-level module that a running step imports late (inside its body) in the
    code archive it came from, after everything the interpreter finds on its own path.

    Modules are cached by name for the whole process: when two versions of one archive run
    at once, a module first imported late by one is what the other gets too.
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        root = _running_from.get()
        if root is None or path is not None:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [root])


@contextlib.contextmanager
def _late_imports_from(root: Path) -> Iterator[None]:
    if not any(isinstance(finder, _LateImports) for finder in sys.meta_path):
        sys.meta_path.append(_LateImports())
    token = _running_from.set(str(root))
    try:
        yield
    finally:
        _running_from.reset(token)


def _step_at(module: types.ModuleType, ref: str, target: StepReference) -> StepDefinition:
    obj: Any = module
    for attr in target.qualname.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise UntrustedStep(
                f"{ref!r}: {target.module} defines no {target.qualname!r}"
            ) from None
    if not isinstance(obj, StepDefinition):
        raise UntrustedStep(
            f"{ref!r} is a {type(obj).__name__}, not a @step: workers run only functions "
            "decorated with @step"
        )
    return obj


class StepResolver:
    """Finds the StepDefinition that a StepSpec names, and runs nothing else.

    Definitions compiled in this process (``add``) are trusted as they are. Anything else is
    imported only once its reference passed the checks: from the run's code archive
    (``step.code``, fetched through ``store`` and extracted under ``cache_dir``), or, for a
    module reference, from a top-level package in ``trusted``. Blocking: run it off the loop.

    ``in_process`` is for the embedded stack, whose broker lives in this process: only this
    process's own code publishes to it, so any ``@step`` it can import may run.
    """

    def __init__(
        self,
        store: ArtifactStore | None = None,
        cache_dir: Path | None = None,
        trusted: Sequence[str] = (),
        *,
        in_process: bool = False,
    ) -> None:
        for name in trusted:
            if not _IDENTIFIER.fullmatch(name):
                raise ConveyorError(f"trusted package {name!r} is not a top-level package name")
        self._store = store
        self._cache_dir = cache_dir
        self._in_process = in_process
        self._trusted = frozenset(trusted)
        self._lock = threading.Lock()
        self._known: dict[str, StepDefinition] = {}
        self._known_files: dict[tuple[str, str], StepDefinition] = {}
        self._resolved: dict[tuple[str, str], StepDefinition] = {}
        self._codes: CodeCache | None = None
        self._roots: dict[str, Path] = {}

    def shown(self, text: str) -> str:
        """``text`` with the paths of the code archives' files as the user's project names
        them (see ``CodeCache.shown``)."""
        codes = self._codes
        return text if codes is None else codes.shown(text)

    @property
    def trusted(self) -> frozenset[str]:
        """The top-level packages whose steps run without a code archive."""
        return self._trusted

    def add(self, definitions: Mapping[str, StepDefinition]) -> None:
        """Make definitions compiled in this process resolvable (the embedded stack): they
        are trusted as they are, under their own reference and under their archive's."""
        with self._lock:
            for ref, definition in definitions.items():
                self._known[ref] = definition
                source = _source_file(definition.fn)
                if source is not None:
                    self._known_files[(source, definition.fn.__qualname__)] = definition

    def resolved(self, step: StepSpec) -> StepDefinition | None:
        """The definition of ``step`` if this resolver found it before; never does I/O, so
        the event loop may ask before it hands ``resolve`` to a thread."""
        key = (step.code.digest if step.code is not None else "", step.ref)
        with self._lock:
            return self._known.get(step.ref) or self._resolved.get(key)

    def resolve(self, step: StepSpec) -> StepDefinition:
        """The definition ``step`` names; UntrustedStep if this worker will not run it."""
        known = self._known_definition(step)
        if known is not None:
            return known
        key = (step.code.digest if step.code is not None else "", step.ref)
        with self._lock:
            found = self._resolved.get(key)
        if found is not None:
            return found
        definition = self._load(step)
        with self._lock:
            return self._resolved.setdefault(key, definition)

    @contextlib.contextmanager
    def running(self, step: StepSpec) -> Iterator[None]:
        """Around a step's body: what it imports late is found in its own code archive."""
        if step.code is None or self._store is None:
            yield
            return
        with _late_imports_from(self._extracted(step.code)):
            yield

    def code_at_hand(self, step: StepSpec) -> CodeAtHand:
        """Where the loads of ``step``'s inputs take the classes of pipeline files from: the
        files of its run's code archive. A step compiled in this process (the embedded stack)
        has its user's files; a step of a trusted package has none, and neither may a
        message make this worker import a file it names."""
        code = step.code
        if code is not None and self._store is not None and self._known_definition(step) is None:
            root = self._extracted(code)
            return ArchiveFiles(root, lambda path: _IMPORTS.file(root, code.digest, path))
        return USERS_FILES if self._in_process else NoCode()

    def _known_definition(self, step: StepSpec) -> StepDefinition | None:
        with self._lock:
            found = self._known.get(step.ref)
            if found is not None or step.code is None or not self._known_files:
                return found
        # A script this process packed: the archive names it relative to the archive's root.
        root = packed_root(step.code.digest)
        if root is None:
            return None
        module, _, qualname = step.ref.rpartition(":")
        path = os.path.normpath(os.path.join(root, module))
        with self._lock:
            return self._known_files.get((path, qualname))

    def _load(self, step: StepSpec) -> StepDefinition:
        if self._in_process and step.code is None:
            found = load_reference(step.ref)
            if not isinstance(found, StepDefinition):
                raise UntrustedStep(f"{step.ref!r} is a {type(found).__name__}, not a @step")
            return found
        target = parse_reference(step.ref)
        if step.code is not None:
            root = self._extracted(step.code)
            if _in_archive(root, target):
                return self._import(step.ref, target, root, step.code.digest)
        if target.is_file:
            raise UntrustedStep(
                f"{step.ref!r} names a file that is not in the run's code archive"
                if step.code
                else f"{step.ref!r} names a file, but the run has no code archive to hold it"
            )
        if target.top not in self._trusted:
            raise UntrustedStep(self._untrusted(step, target))
        return self._import(step.ref, target, None, None)

    def _untrusted(self, step: StepSpec, target: StepReference) -> str:
        shipped = "is not in the run's code archive" if step.code else "comes with no code archive"
        trusts = ", ".join(sorted(self._trusted)) or "none"
        return (
            f"{step.ref!r} {shipped} and {target.top!r} is not a trusted package (this worker "
            f"trusts: {trusts}); ship it in the run's code or install and trust it on workers"
        )

    def _import(
        self, ref: str, target: StepReference, root: Path | None, digest: str | None
    ) -> StepDefinition:
        try:
            if root is None or digest is None:
                module = _IMPORTS.trusted(target.module)
            elif target.is_file:
                module = _IMPORTS.file(root, digest, target.module)
            else:
                module = _IMPORTS.module(root, target.module)
        except ConveyorError:
            raise
        except Exception as exc:
            raise ConveyorError(f"cannot import {ref!r}: {type(exc).__name__}: {exc}") from exc
        return _step_at(module, ref, target)

    def _extracted(self, code: BlobRef) -> Path:
        if self._store is None:
            raise ConveyorError(
                "the run ships its code in an archive, but this worker has no artifact store "
                "to fetch it from"
            )
        with self._lock:
            root = self._roots.get(code.digest)
            if root is not None:
                return root
            if self._codes is None:
                self._codes = CodeCache(self._store, self._cache_dir or default_cache_dir())
            codes = self._codes
        root = codes.extracted(code)
        with self._lock:
            self._roots[code.digest] = root
        return root
