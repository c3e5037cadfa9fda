"""The ``local`` artifact store flavor: a directory, addressed by content."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conveyor.contracts import ArtifactUnreadable, BlobRef, OutsideStore, StoreUnavailable
from conveyor.workers import digests

T = TypeVar("T")


class LocalArtifactStoreConfig(BaseModel):
    """Configuration of the ``local`` artifact store flavor."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="Directory that holds the artifacts; for workers on other machines, use "
        "an s3 store instead",
        # A relative path is of the working directory of whoever types it, also when the
        # CLI sends it to a server (service/cli/components.py makes it absolute first).
        json_schema_extra={"client_path": True},
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory (an empty path would be the current one)")
        if any(ord(c) < 32 for c in value):
            raise ValueError("must not contain control characters")
        # A relative path would mean a different directory for each working directory.
        path = Path(value).expanduser().resolve()
        # Refused when registered, not when the first step writes an output.
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory")
        return str(path)


_CONTENT_NAME = re.compile(r"/[0-9a-f]{2}/[0-9a-f]{64}")
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# Non-blocking: a FIFO swapped in must not hang the reader (a regular file ignores it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
_FD_FOLDER = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
STAGING = ".staging"
"""Folder under the root where files are written before they are renamed into place."""


SMALL_FILE = 1 << 16
"""Files up to this size are checked, read and written with plain descriptor calls.

Each system call of a step's thread lets go of the GIL and takes it back, which costs far
more than the call while the event loop is busy: ``open()`` adds an ``fstat``, an
``isatty`` ``ioctl`` and, to read, another ``fstat``, an ``lseek`` and a read of the end;
the check of an existing output a ``stat`` and a size lookup. A step of the embedded
fan-out made about 21 such calls and spent 0.2 ms of CPU in its thread for 0.03 ms of
work; these paths make about 11."""


def _holds_small(path: str, digest: str, size: int, uri: str) -> bool:
    """Whether the file at ``path`` (of at most SMALL_FILE bytes) holds ``digest``, of
    ``size`` bytes: open, one read, close. A file damaged in place keeps its size, so its
    bytes are checked, and a step run again (its cached outputs were found corrupted)
    writes them afresh."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError:
        return False  # missing, or unreadable: written afresh
    try:
        data = os.read(fd, size + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(data) != size:
        return False
    try:
        digests.verify_bytes(data, digest, uri)
    except ArtifactUnreadable:
        return False
    return True


def _read_to_end(fd: int, size: int) -> bytes:
    """The bytes of the open regular file ``fd``, ``size`` of them by its ``fstat``: one
    read, unless the file is cut short (a read of the end then tells)."""
    data = os.read(fd, size + 1)
    if len(data) >= size:
        return data
    parts, got = [data], len(data)
    while got < size:
        part = os.read(fd, size - got + 1)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _write_new(path: str, data: bytes) -> None:
    """Create the file ``path`` holding ``data`` (as ``open(path, "wb")`` would, with fewer
    system calls)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


class LocalArtifactStore:
    """Artifacts as files ``ROOT/ab/abcdef...`` named by the digest of their bytes.

    A file is written under ``ROOT/.staging``, hashed, and renamed into place, so a reader
    never sees a partial file and a re-executed step rewrites identical bytes.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self._root_text = str(self.root)
        self._root_uri = self.root.as_uri()
        self._staging = os.path.join(self._root_text, STAGING)
        self._made_dirs: set[str] = set()
        self._tmp_names = itertools.count()
        # Unique across the machines that share the directory, not just across processes.
        self._tmp_prefix = f"{socket.gethostname()}-{os.getpid()}-"

    @property
    def location(self) -> str:
        return f"directory {self._root_text}"

    def _makedirs(self, folder: str) -> None:
        # os-level calls on strings: this runs once per step output, and pathlib's object
        # overhead was most of its cost.
        if folder not in self._made_dirs:
            os.makedirs(folder, exist_ok=True)
            self._made_dirs.add(folder)

    def _staged(self) -> str:
        self._makedirs(self._staging)
        return os.path.join(self._staging, f"{self._tmp_prefix}{next(self._tmp_names)}")

    def _stored(self, digest: str, size: int) -> tuple[BlobRef, str, bool]:
        """The reference of ``digest``, its file, and whether that file holds it already."""
        hexdigest = digest.partition(":")[2]
        target = os.path.join(self._root_text, hexdigest[:2], hexdigest)
        ref = BlobRef(uri=f"{self._root_uri}/{hexdigest[:2]}/{hexdigest}", digest=digest, size=size)
        if size <= SMALL_FILE:
            return ref, target, _holds_small(target, digest, size, ref.uri)
        try:
            if os.stat(target).st_size != size:
                return ref, target, False
            # A file damaged in place keeps its size: checked, so that a step run again
            # (its cached outputs were found corrupted) writes them afresh.
            digests.verify_file(target, digest, ref.uri)
        except (FileNotFoundError, ArtifactUnreadable):
            return ref, target, False
        return ref, target, True

    def _commit(self, tmp: str, digest: str, size: int) -> BlobRef:
        ref, target, exists = self._stored(digest, size)
        if exists:
            os.unlink(tmp)
        else:
            self._makedirs(os.path.dirname(target))
            os.replace(tmp, target)
        return ref

    @contextlib.contextmanager
    def _staged_file(self) -> Iterator[str]:
        """The path of a new file under ``.staging``, removed if writing it fails."""
        tmp = self._staged()
        try:
            yield tmp
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put(self, write: Callable[[str], str | None]) -> BlobRef:
        with self._staged_file() as tmp:
            digest = write(tmp)
            if digest is None:
                digest, size = digests.of_file(tmp)
            else:
                size = os.stat(tmp).st_size
            return self._commit(tmp, digest, size)

    def put_bytes(self, data: bytes) -> BlobRef:
        digest = digests.of_bytes(data)
        ref, target, exists = self._stored(digest, len(data))
        if exists:
            return ref  # a content address holds the same bytes: nothing to write
        with self._staged_file() as tmp:
            _write_new(tmp, data)
            self._makedirs(os.path.dirname(target))
            # Not checked again: another writer's file there holds these very bytes.
            os.replace(tmp, target)
        return ref

    def path_of(self, uri: str) -> str:
        """The file behind ``uri``; refuses anything that resolves outside the root."""
        if uri.startswith(self._root_uri) and _CONTENT_NAME.fullmatch(uri, len(self._root_uri)):
            # The shape this store writes: hex names only, nothing that could climb out.
            return self._root_text + uri[len(self._root_uri) :]
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise OutsideStore(f"{uri!r} is not a file URI of this store")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise OutsideStore(f"{uri!r} is outside the artifact store {self.root}")
        return str(path)

    def _open(self, uri: str) -> int:
        return self._open_sized(uri)[0]

    def _open_sized(self, uri: str) -> tuple[int, int]:
        """A descriptor of the regular file behind ``uri``, opened without following a link,
        and its size.

        ``path_of`` checks a name; a link swapped in after that check would still be
        followed by an ``open`` of the name. Each folder from the root down, and the file,
        is opened relative to the one before with ``O_NOFOLLOW``: what is read is what was
        checked, and a link anywhere below the root is refused.
        """
        parts = self._parts(uri)
        try:
            folder = os.open(self._root_text, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for part in parts[:-1]:
                    inner = os.open(part, _FOLDER_FLAGS, dir_fd=folder)
                    os.close(folder)
                    folder = inner
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
            finally:
                os.close(folder)
        except FileNotFoundError:
            raise ArtifactUnreadable(
                f"artifact {uri} is missing from its store, the folder {self._root_text} of this "
                "machine; processes on other machines need a store they all reach, such as an "
                "s3 store (docs/scale-out.md)"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OutsideStore(f"{uri!r} goes through a link; refused") from None
            raise ArtifactUnreadable(f"cannot read artifact {uri}: {exc.strerror}") from None
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            os.close(fd)
            raise OutsideStore(f"{uri!r} is not a regular file; refused")
        return fd, status.st_size

    def _parts(self, uri: str) -> tuple[str, ...]:
        """The names from the root down to the file behind ``uri`` (checked by ``path_of``)."""
        start = len(self._root_uri)
        if uri.startswith(self._root_uri) and _CONTENT_NAME.fullmatch(uri, start):
            # The shape this store writes (``/ab/abcdef...``), without pathlib: every step
            # input is read through here.
            return uri[start + 1 : start + 3], uri[start + 4 :]
        return Path(self.path_of(uri)).relative_to(self.root).parts

    def get_bytes(self, uri: str, digest: str) -> bytes:
        fd, size = self._open_sized(uri)
        try:
            data = _read_to_end(fd, size)
        finally:
            os.close(fd)
        digests.verify_bytes(data, digest, uri)
        return data

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        fd = self._open(uri)
        try:
            # The open file by its descriptor: verified and read are the same bytes, whatever
            # the name points at by then.
            path = f"{_FD_FOLDER}/{fd}"
            digests.verify_file(path, digest, uri)
            return read(path)
        finally:
            os.close(fd)

    def check(self) -> None:
        try:
            tmp = self._staged()
            with open(tmp, "wb"):
                pass
            os.unlink(tmp)
        except OSError as exc:
            self._made_dirs.clear()
            raise StoreUnavailable(
                f"artifact store directory {self._root_text} is not writable: {exc.strerror or exc}"
            ) from None
