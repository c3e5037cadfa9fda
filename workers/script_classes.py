"""Classes of pipeline files in stored values: which class of the code at hand stands for
one that a stored value names.

A class defined in a pipeline file lives in a module whose name depends on the process that
loaded the file: ``conveyor_user_<digest16>_<stem>`` on a worker (one name per version of the
run's code), ``conveyor_user_<sha12>`` in a client that loaded the file by its path, and
``__main__`` in ``python file.py``. A stored model names that module, which another process,
or a later version of the code, does not have. A load takes the class of the same file from
the code at hand instead: a worker from the code archive of the run whose step loads it, a
client from the file its user names when trusting the class (``mk.py:Doubler``). Finding that
file imports nothing; the file is imported only for a class the load trusts, and never
because stored bytes name it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from conveyor.contracts import ConveyorError
from conveyor.workers.steps import FILE_MODULE_PREFIX, is_script_module, load_file, missing_name

_ARCHIVE_MODULE = re.compile(re.escape(FILE_MODULE_PREFIX) + r"([0-9a-f]{16})_(\w+)")
"""A file of a code archive, as a worker loads it (``archive_module_name``)."""
_CLIENT_MODULE = re.compile(re.escape(FILE_MODULE_PREFIX) + r"([0-9a-f]{12})")
"""A file a client loaded by its path (``steps.load_file``)."""


class ScriptClassMissing(ConveyorError):
    """The file that stands for a stored value's pipeline file cannot provide its class."""


def file_stem(path: str) -> str:
    """The part of a worker's module name that says which file of the archive it is."""
    return re.sub(r"[^A-Za-z0-9_]", "_", path.removesuffix(".py"))


def archive_module_name(digest: str, path: str) -> str:
    """The module name of the file ``path`` of the code archive ``digest`` on a worker."""
    # One name per (archive, file): two versions of the same script never share a module.
    return f"{FILE_MODULE_PREFIX}{digest.partition(':')[2][:16]}_{file_stem(path)}"


SHOWN_FILES_CHECKED = 1000
"""At most this many files of the working directory are tried for a client's stored name."""


def shown(type_name: str) -> str:
    """A stored type's name as its user would name it, ``mk.py:Doubler``: for a worker's
    archive file, from its stem (a guess: ``a/b.py`` and ``a_b.py`` have one stem); for a
    file a client loaded by its path, the file of the working directory that it was."""
    module, _, name = type_name.rpartition(".")
    archived = _ARCHIVE_MODULE.fullmatch(module)
    if archived is not None:
        return f"{archived.group(2)}.py:{name}"
    if _CLIENT_MODULE.fullmatch(module) is None:
        return type_name
    matches = _matcher(module)
    here = Path.cwd()
    with contextlib.suppress(OSError):
        for path in itertools.islice(here.glob("*.py"), SHOWN_FILES_CHECKED):
            if matches(path.resolve()):
                return f"{path.name}:{name}"
    return f"<its file>.py:{name}"


class CodeAtHand(Protocol):
    """Where a load takes the classes of pipeline files from."""

    def claims(self, module: str) -> bool:
        """Whether classes of the stored ``module`` must come from this code; if not, the
        module serves as this process has it (or the value cannot be loaded here)."""

    def file_of(self, module: str, name: str, trusted: frozenset[str]) -> str | None:
        """The class ``name`` of the file of this code that the stored ``module`` was loaded
        from, as its user names it (``path.py:name``), or None. Imports nothing."""

    def module_of(self, reference: str) -> types.ModuleType:
        """The module of a reference ``file_of`` gave, imported if need be."""

    def lacking(self, names: list[str], trusted: frozenset[str]) -> str:
        """Why the classes ``names`` (as ``shown`` names them) were not found here."""


class NoCode:
    """A step of an installed package on a worker: it has no pipeline file to take from."""

    def claims(self, module: str) -> bool:
        return False

    def file_of(self, module: str, name: str, trusted: frozenset[str]) -> str | None:
        return None

    def module_of(self, reference: str) -> types.ModuleType:
        raise ScriptClassMissing(f"no pipeline file is at hand for {reference}", retryable=False)

    def lacking(self, names: list[str], trusted: frozenset[str]) -> str:
        return "the step that loads them ships no pipeline file to take them from"


class ArchiveFiles:
    """A worker's: the files of the code archive (extracted at ``root``) of the run whose step
    loads the value; ``load`` imports one of them by its path in the archive."""

    def __init__(self, root: Path, load: Callable[[str], types.ModuleType]) -> None:
        self._root = root
        self._load = load

    def claims(self, module: str) -> bool:
        # Every version's, the run's own included: a model loads with the same class
        # whichever worker, and whatever it imported before, loads it.
        return _ARCHIVE_MODULE.fullmatch(module) is not None

    def file_of(self, module: str, name: str, trusted: frozenset[str]) -> str | None:
        found = _ARCHIVE_MODULE.fullmatch(module)
        if found is None:
            return None
        files = [path for path in self._files if file_stem(path) == found.group(2)]
        if len(files) > 1:
            raise ScriptClassMissing(
                f"the run's code has several files that could hold {shown(module + '.' + name)} "
                f"({', '.join(files)}): rename one of them",
                retryable=False,
            )
        return f"{files[0]}:{name}" if files else None

    def module_of(self, reference: str) -> types.ModuleType:
        return self._load(reference.rpartition(":")[0])

    def lacking(self, names: list[str], trusted: frozenset[str]) -> str:
        return "a step takes them from its own run's code, and this run's code has no such file"

    @functools.cached_property
    def _files(self) -> list[str]:
        """The archive's Python files, by their paths in it (read once, for one load)."""
        found = []
        for folder, dirs, files in os.walk(self._root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            found += [
                Path(folder, file).relative_to(self._root).as_posix()
                for file in files
                if file.endswith(".py")
            ]
        return found


class UsersFiles:
    """A client's: the pipeline files its user names when trusting a class (``mk.py:Doubler``,
    a path from the working directory), and those this process runs (``__main__``, a file
    loaded by its path), trusted by their classes' own names."""

    def claims(self, module: str) -> bool:
        return is_script_module(module) and module not in sys.modules

    def file_of(self, module: str, name: str, trusted: frozenset[str]) -> str | None:
        matches = _matcher(module)
        found: dict[Path, str] = {}
        for path, reference in _trusted_files(name, trusted):
            if matches(path):
                found.setdefault(path, reference)
        if len(found) > 1:
            raise ScriptClassMissing(
                f"several trusted files could hold {shown(module + '.' + name)} "
                f"({', '.join(sorted(found.values()))}): trust the class of one of them",
                retryable=False,
            )
        return next(iter(found.values()), None)

    def module_of(self, reference: str) -> types.ModuleType:
        file, colon, _ = reference.rpartition(":")
        if not colon:  # a class of a module this process runs, by its own name
            return sys.modules[reference.rpartition(".")[0]]
        path = Path(file).expanduser().resolve()
        main = sys.modules.get("__main__")
        if _file_of(main) == path and main is not None:
            return main  # the script the user runs: its classes are the ones they hold
        return load_file(str(path))

    def lacking(self, names: list[str], trusted: frozenset[str]) -> str:
        classes = {name.rpartition(":")[2] for name in names}
        tried = sorted(
            entry[:200]
            for entry in trusted
            if isinstance(entry, str)
            and entry.rpartition(":")[2] in classes
            and entry.rpartition(":")[0].endswith(".py")
        )
        if tried:
            return (
                f"a client takes them from the file it trusts them by, and {', '.join(tried)} "
                "is not that file (there is no such file here, or it is another one)"
            )
        example = ", ".join(repr(name[:200]) for name in names[:2])
        return (
            "a client takes them from the file it trusts them by, its path from the working "
            f"directory: pass trust=[{example}] to run.load() or Client.load_artifact(), or "
            "--trust to conveyor artifact get"
        )


def _file_of(module: types.ModuleType | None) -> Path | None:
    filename = getattr(module, "__file__", None)
    return None if filename is None else Path(filename).resolve()


def _trusted_files(name: str, trusted: frozenset[str]) -> Iterator[tuple[Path, str]]:
    """(file, trusted name) of each trusted class called ``name`` of a pipeline file."""
    for entry in trusted:
        if not isinstance(entry, str):
            continue
        file, colon, qualname = entry.rpartition(":")
        if colon and qualname == name and file.endswith(".py"):
            path = Path(file).expanduser().resolve()
            if path.is_file():
                yield path, entry
            continue
        module, _, qualname = entry.rpartition(".")
        if qualname == name and is_script_module(module):
            loaded = _file_of(sys.modules.get(module))
            if loaded is not None:
                yield loaded, entry


def _matcher(module: str) -> Callable[[Path], bool]:
    """Whether a file (an absolute path) is one the stored ``module`` may have been."""
    archived = _ARCHIVE_MODULE.fullmatch(module)
    if archived is not None:
        stem = archived.group(2)
        # The archive names the file from its root, some folder above it.
        return lambda path: any(
            file_stem("/".join(path.parts[-depth:])) == stem for depth in range(1, len(path.parts))
        )
    loaded = _CLIENT_MODULE.fullmatch(module)
    if loaded is not None:
        digest = loaded.group(1)
        return lambda path: hashlib.sha1(str(path).encode()).hexdigest()[:12] == digest
    return lambda path: False


USERS_FILES = UsersFiles()
_at_hand: ContextVar[CodeAtHand | None] = ContextVar("conveyor_code_at_hand", default=None)


@contextmanager
def taken_from(code: CodeAtHand) -> Iterator[None]:
    """Within the block, loads take pipeline files' classes from ``code``. Workers set it for
    every load; a client's loads take them from its user's files (``UsersFiles``)."""
    token = _at_hand.set(code)
    try:
        yield
    finally:
        _at_hand.reset(token)


def at_hand() -> CodeAtHand:
    """Where the load under way takes pipeline files' classes from."""
    return _at_hand.get() or USERS_FILES


@dataclass(frozen=True)
class StandIns:
    """What the code at hand has for the pipeline files' classes a stored value names."""

    names: dict[str, str]
    """Stored type name -> the class that stands in for it, as its user names it."""
    lost: list[str]
    """Stored type names that nothing here can build."""


def stand_ins(needed: Iterable[str], trusted: frozenset[str], code: CodeAtHand) -> StandIns:
    """Which classes of ``code`` stand in for the pipeline files' classes of ``needed``."""
    names: dict[str, str] = {}
    lost: list[str] = []
    for type_name in needed:
        module, _, name = type_name.rpartition(".")
        if not is_script_module(module):
            continue
        if code.claims(module):
            found = code.file_of(module, name, trusted)
            if found is None:
                lost.append(type_name)
            else:
                names[type_name] = found
        elif module.startswith(FILE_MODULE_PREFIX) and module not in sys.modules:
            lost.append(type_name)
    return StandIns(names, sorted(lost))


def renames(names: dict[str, str], code: CodeAtHand) -> dict[str, str]:
    """Stored module -> the module at hand that has its classes, for ``names`` (the trusted
    part of ``StandIns.names``): imports their files, and says which class a file lacks."""
    modules: dict[str, str] = {}
    for type_name, reference in names.items():
        stored, _, name = type_name.rpartition(".")
        module = code.module_of(reference)
        if not isinstance(getattr(module, name, None), type | types.FunctionType):
            where = reference.rpartition(":")[0] or reference.rpartition(".")[0]
            known = [
                key
                for key, value in vars(module).items()
                if isinstance(value, type) and value.__module__ == module.__name__
            ]
            raise ScriptClassMissing(
                f"the stored estimator holds {reference}, and "
                f"{missing_name(where + ' (the code at hand)', name, known, kind='class')}: "
                "define it there again, or run the step that made the estimator again "
                "(--no-cache) so that this version of the code writes it",
                retryable=False,
            )
        if modules.setdefault(stored, module.__name__) != module.__name__:
            raise ScriptClassMissing(
                f"the classes of one pipeline file of the stored estimator ({stored}) are "
                "trusted by different files: trust them by the same file",
                retryable=False,
            )
    return {stored: now for stored, now in modules.items() if now != stored}
