"""Which pipelines an HTTP client may name: files of one folder, modules of trusted packages.

Compiling a pipeline imports its module, and an import runs the module's top level: a
reference from a request is an instruction to run code. The server compiles only

- a ``.py`` file under its pipelines folder (``conveyor server up --pipelines DIR``, by
  default the folder it was started in), named relative to that folder or by its absolute
  path, with no hidden folder on the way and no link out of the folder; or
- a module of a top-level package it trusts (``--trust PKG``), as workers trust packages.

Everything else is refused before anything is imported, with 403 (a reference it may not
name) or 422 (not a reference at all). The rule is the workers' rule (``step_resolver``)
with the pipelines folder in the place of the run's code archive.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from conveyor.contracts import ValidationError
from conveyor.service.api.errors import Forbidden

MAX_REF_LENGTH = 1000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A file or folder name: no leading dot (no '.', '..' or hidden folder), no separator.
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HELP = "name it as path/to/file.py:pipeline or package.module:pipeline"


def _invalid(ref: str, why: str) -> ValidationError:
    shown = ref if len(ref) <= 200 else ref[:200] + "..."
    return ValidationError(f"{shown!r} is not a pipeline reference: {why}; {_HELP}")


def _identifiers(ref: str, dotted: str, what: str) -> list[str]:
    names = dotted.split(".")
    if not all(_IDENTIFIER.fullmatch(name) for name in names):
        raise _invalid(ref, f"the {what} {dotted!r} is not a dotted Python name")
    return names


@dataclass(frozen=True)
class TrustedPipelines:
    """The rule: files under ``folder`` and modules of the ``packages``."""

    folder: Path
    packages: frozenset[str]

    @classmethod
    def of(cls, folder: str | Path | None, packages: Iterable[str]) -> TrustedPipelines:
        """The rule for ``folder`` (default: the working directory) and ``packages``."""
        found = set()
        for name in packages:
            if not _IDENTIFIER.fullmatch(name):
                raise ValidationError(f"trusted package {name!r} is not a top-level package name")
            found.add(name)
        resolved = Path(folder if folder is not None else os.getcwd()).expanduser().resolve()
        return cls(resolved, frozenset(found))

    def checked(self, ref: str) -> str:
        """The reference to import for ``ref``: a file as its absolute path, or a module.

        Raises Forbidden for a reference outside the rule, ValidationError for a malformed
        one. Only names and the file system's links are looked at: nothing is imported.
        """
        if len(ref) > MAX_REF_LENGTH:
            raise _invalid(ref, f"it is longer than {MAX_REF_LENGTH} characters")
        module, sep, qualname = ref.rpartition(":")
        if not sep or not module or not qualname:
            raise _invalid(ref, "it has no ':' between module and pipeline")
        _identifiers(ref, qualname, "pipeline name")
        if module.endswith(".py") or "/" in module or "\\" in module:
            return f"{self._file(ref, module)}:{qualname}"
        top = _identifiers(ref, module, "module")[0]
        if top not in self.packages:
            trusted = ", ".join(sorted(self.packages)) or "none"
            raise Forbidden(
                f"{ref!r}: this server compiles modules of the packages it trusts only "
                f"(trusted: {trusted}); start it with --trust {top} if {top!r} is yours, or "
                f"name a file under its pipelines folder {self.folder} (--pipelines)"
            )
        return ref

    def _file(self, ref: str, path: str) -> Path:
        if "\\" in path or not path.endswith(".py"):
            raise _invalid(ref, "a file is named by a path with '/' that ends in .py")
        absolute = Path(path) if path.startswith("/") else self.folder / path
        outside = Forbidden(
            f"{ref!r}: this server compiles files under its pipelines folder {self.folder} "
            "only (conveyor server up --pipelines DIR)"
        )
        try:
            relative = Path(os.path.normpath(absolute)).relative_to(self.folder)
        except ValueError:
            raise outside from None
        if ".." in Path(path).parts or not all(
            _PATH_SEGMENT.fullmatch(part) for part in relative.parts
        ):
            raise Forbidden(
                f"{ref!r}: a file under the pipelines folder (--pipelines) is named without "
                "'..' and is not in a hidden folder"
            )
        target = self.folder / relative
        try:
            inside = target.resolve().is_relative_to(self.folder)
        except (OSError, RuntimeError):  # a loop of links
            inside = False
        if not inside:
            raise outside  # a link out of the folder
        if not target.is_file():
            raise ValidationError(f"{ref!r}: there is no file {target}")
        return target
