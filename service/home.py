"""Where a client keeps its metadata store and default artifacts: CONVEYOR_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from conveyor.contracts import ConveyorError

HOME_ENV = "CONVEYOR_HOME"
STACK_ENV = "CONVEYOR_STACK"


@dataclass(frozen=True)
class Home:
    """The folder of one client's state."""

    path: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Home:
        """``path``, else $CONVEYOR_HOME, else the platform's user data directory."""
        # Imported here: every CLI module imports this one, and `conveyor --help` resolves
        # no home.
        import platformdirs

        chosen = path or os.environ.get(HOME_ENV) or platformdirs.user_data_path("conveyor")
        return cls(Path(chosen).expanduser().resolve())

    def check(self) -> None:
        """Raise a one-line ConveyorError if this folder cannot be used: it, or a folder above
        it, is a file, or this user may not write where it is (or would be created)."""
        problem = home_problem(self.path)
        if problem:
            raise ConveyorError(
                f"cannot keep Conveyor's state in {self.path} ({HOME_ENV}): {problem}"
            )

    @property
    def db_path(self) -> Path:
        return self.path / "conveyor.db"

    @property
    def default_artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def code_cache(self) -> Path:
        """Where a worker keeps the code archives of the runs it executed, unpacked."""
        return self.path / "cache" / "code"


def home_problem(path: Path) -> str | None:
    """Why the folder ``path`` cannot hold a client's state, or None. It need not exist: then
    the nearest existing folder above it must be writable, as it is made there."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "it is a file" if existing == path else f"{existing} is a file"
        return f"{what}, not a folder; set {HOME_ENV} to a folder (it is made if missing)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"this user may not write to {existing}; set {HOME_ENV} to a folder it may write, "
            "or change the folder's permissions"
        )
    return None
