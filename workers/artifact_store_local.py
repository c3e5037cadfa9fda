"""The ``local`` artifact store flavor: a directory, addressed by content."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from conveyor.contracts import ConveyorError


class LocalArtifactStoreConfig(BaseModel):
    """Configuration of the ``local`` artifact store flavor."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="Directory that holds the artifacts; shared storage when workers run on "
        "several machines"
    )


class ArtifactUnreadable(ConveyorError):
    """An artifact is missing, outside the store, or its bytes do not match its sha256."""


class LocalArtifactStore:
    """Artifacts as files ``ROOT/ab/abcdef...`` named by the sha256 of their bytes.

    Writes go to a temporary file in the same directory and are renamed into place, so a
    reader never sees a partial file and a re-executed step rewrites identical bytes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._made_dirs: set[str] = set()

    def put(self, data: bytes) -> tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        folder = self.root / digest[:2]
        target = folder / digest
        if digest[:2] not in self._made_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(digest[:2])
        if not (target.exists() and target.stat().st_size == len(data)):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return target.as_uri(), digest

    def path_of(self, uri: str) -> str:
        """The file behind ``uri``; refuses anything that resolves outside the root."""
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ArtifactUnreadable(f"{uri!r} is not a file URI of this store")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactUnreadable(f"{uri!r} is outside the artifact store {self.root}")
        return str(path)

    def get(self, uri: str, sha256: str) -> bytes:
        path = self.path_of(uri)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ArtifactUnreadable(f"cannot read artifact {uri}: {exc.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ArtifactUnreadable(
                f"artifact {uri} is corrupted: sha256 is {actual[:12]}..., "
                f"expected {sha256[:12]}..."
            )
        return data
