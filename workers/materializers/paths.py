"""A ``pathlib.Path`` to a file or a directory, stored as a tar archive and loaded as a path
to a fresh local copy (a new temporary directory per load, which the loader owns).

Only regular files and directories are stored: a symbolic link, a device or a socket is
refused, naming it, rather than followed out of the tree. Reading refuses any member that
is not a plain file or directory under the one top name (no absolute names, no ``..``), and
archives of more than ``MAX_ENTRIES`` entries or ``MAX_BYTES`` bytes, before writing anything.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from conveyor.contracts import ArtifactRef, ConveyorError

MAX_ENTRIES = 100_000
MAX_BYTES = 64 << 30
COPY_CHUNK = 1 << 20


class PathRefused(ConveyorError):
    """A path that cannot be stored, or an archive that will not be unpacked."""


def _entries(root: Path) -> Iterator[Path]:
    """``root`` and, for a directory, everything under it; refuses what is not a plain file
    or directory."""
    stack = [root]
    while stack:
        path = stack.pop()
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise PathRefused(
                f"{path} is a symbolic link, which is not stored (it could point out of the "
                "tree): copy what it points to instead",
                retryable=False,
            )
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise PathRefused(f"{path} is neither a file nor a directory", retryable=False)
        yield path
        if stat.S_ISDIR(mode):
            stack.extend(sorted(path.iterdir(), reverse=True))


def _info(path: Path, name: str) -> tarfile.TarInfo:
    status = path.lstat()
    info = tarfile.TarInfo(name)
    info.mtime = int(status.st_mtime)
    if stat.S_ISDIR(status.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size = status.st_size
        info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
    return info


class PathArchive:
    """A file or a directory tree."""

    name = "path"
    version = "1"
    types = ("pathlib.Path",)

    def handles(self, value: object) -> bool:
        return isinstance(value, Path)

    def save(self, value: object, path: str) -> str | None:
        assert isinstance(value, Path)
        if not value.exists() and not value.is_symlink():
            raise PathRefused(f"{value} does not exist", retryable=False)
        root = value.absolute()
        top = root.name or "root"
        count = total = 0
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
            for entry in _entries(root):
                info = _info(entry, str(PurePosixPath(top, *entry.relative_to(root).parts)))
                count, total = count + 1, total + info.size
                _check_bounds(count, total, str(value))
                if info.isdir():
                    archive.addfile(info)
                else:
                    with entry.open("rb") as handle:
                        archive.addfile(info, handle)
        return None

    def load(self, path: str, ref: ArtifactRef) -> object:
        target = Path(tempfile.mkdtemp(prefix="conveyor-path-"))
        try:
            with tarfile.open(path, "r:") as archive:
                members = archive.getmembers()
                top = checked_top(members)
                for member in members:
                    _unpack(archive, member, target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return target / top


def _check_bounds(count: int, total: int, what: str) -> None:
    if count > MAX_ENTRIES:
        raise PathRefused(f"{what} holds more than {MAX_ENTRIES} entries", retryable=False)
    if total > MAX_BYTES:
        raise PathRefused(f"{what} holds more than {MAX_BYTES >> 30} GiB", retryable=False)


def checked_top(members: list[tarfile.TarInfo]) -> str:
    """The one top name of an archive's members; refuses a member that is not a plain file
    or directory, escapes it, or breaks the bounds."""
    if not members:
        raise PathRefused("the stored path archive is empty", retryable=False)
    _check_bounds(len(members), sum(m.size for m in members), "the stored path archive")
    top = PurePosixPath(members[0].name).parts[0] if members[0].name else ""
    for member in members:
        parts = PurePosixPath(member.name).parts
        if not (member.isfile() or member.isdir()):
            raise PathRefused(f"archive member {member.name[:200]!r} is a link or a device")
        if member.name.startswith("/") or ".." in parts or not parts or parts[0] != top:
            raise PathRefused(f"archive member {member.name[:200]!r} escapes its directory")
    if top in ("", ".", ".."):
        raise PathRefused(f"the stored path archive has no usable top name: {top!r}")
    return top


def _unpack(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    destination = target.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        destination.mkdir(parents=True, exist_ok=True)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    assert source is not None  # a regular file, checked
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with source, open(os.open(destination, flags, member.mode & 0o755 | 0o600), "wb") as out:
        shutil.copyfileobj(source, out, COPY_CHUNK)
