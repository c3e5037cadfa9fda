"""The ``local`` artifact store flavor: a directory, addressed by content."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conveyor.contracts import ConveyorError


class LocalArtifactStoreConfig(BaseModel):
    """Configuration of the ``local`` artifact store flavor."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="Directory that holds the artifacts; shared storage when workers run on "
        "several machines"
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # A relative path would mean a different directory for each working directory.
        return str(Path(value).expanduser().resolve())


_CONTENT_NAME = re.compile(r"/[0-9a-f]{2}/[0-9a-f]{64}")


class ArtifactUnreadable(ConveyorError):
    """An artifact is missing, outside the store, or its bytes do not match its sha256."""


class LocalArtifactStore:
    """Artifacts as files ``ROOT/ab/abcdef...`` named by the sha256 of their bytes.

    Writes go to a temporary file in the same directory and are renamed into place, so a
    reader never sees a partial file and a re-executed step rewrites identical bytes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._root_text = str(self.root)
        self._root_uri = self.root.as_uri()
        self._made_dirs: set[str] = set()
        self._tmp_names = itertools.count()
        # Unique across the machines that share the directory, not just across processes.
        self._tmp_prefix = f".tmp-{socket.gethostname()}-{os.getpid()}-"

    def put(self, data: bytes) -> tuple[str, str]:
        # os-level calls on strings: this runs once per step output, and pathlib's object
        # overhead was most of its cost.
        digest = hashlib.sha256(data).hexdigest()
        folder = os.path.join(self._root_text, digest[:2])
        target = os.path.join(folder, digest)
        if digest[:2] not in self._made_dirs:
            os.makedirs(folder, exist_ok=True)
            self._made_dirs.add(digest[:2])
        try:
            exists = os.stat(target).st_size == len(data)
        except FileNotFoundError:
            exists = False
        if not exists:
            tmp = os.path.join(folder, f"{self._tmp_prefix}{next(self._tmp_names)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return f"{self._root_uri}/{digest[:2]}/{digest}", digest

    def path_of(self, uri: str) -> str:
        """The file behind ``uri``; refuses anything that resolves outside the root."""
        if uri.startswith(self._root_uri) and _CONTENT_NAME.fullmatch(uri, len(self._root_uri)):
            # The shape this store writes: hex names only, nothing that could climb out.
            return self._root_text + uri[len(self._root_uri) :]
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
