"""Where a client keeps its metadata store and default artifacts: CONVEYOR_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

HOME_ENV = "CONVEYOR_HOME"
STACK_ENV = "CONVEYOR_STACK"


@dataclass(frozen=True)
class Home:
    """The folder of one client's state."""

    path: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Home:
        """``path``, else $CONVEYOR_HOME, else the platform's user data directory."""
        chosen = path or os.environ.get(HOME_ENV) or platformdirs.user_data_path("conveyor")
        return cls(Path(chosen).expanduser().resolve())

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
