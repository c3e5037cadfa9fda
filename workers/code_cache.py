"""The worker side of code archives: fetch each once per digest, extract it safely.

A worker keeps the archives of the runs it executed, one folder per digest, and extracts them
refusing anything that could write outside that folder (absolute names, ``..``, links, bombs).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import platformdirs

from conveyor.contracts import ArtifactStore, ArtifactUnreadable, BlobRef, UntrustedStep
from conveyor.contracts.models import DIGEST_PATTERN
from conveyor.workers.code_archive import megabytes

DEFAULT_MAX_UNPACKED = 1 << 30
"""The most bytes a worker extracts from one archive: a zip bomb stops here."""
DEFAULT_MAX_ENTRIES = 100_000
"""The most files a worker extracts from one archive."""
MAX_ENTRY_NAME = 1000
_STALE_STAGING_S = 24 * 3600
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """Where a worker keeps extracted archives unless told otherwise."""
    return platformdirs.user_cache_path("conveyor") / "code"


def _refuse(name: str, why: str) -> UntrustedStep:
    shown = name if len(name) <= 200 else name[:200] + "..."
    return UntrustedStep(f"the run's code archive has an unsafe entry {shown!r}: {why}")


def _unsafe_kind(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if info.is_dir() or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
        return "not a regular file"
    if info.flag_bits & 0x1:
        return "encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return "an unsupported compression method"
    return None


def _unsafe_name(name: str) -> str | None:
    if not name or len(name) > MAX_ENTRY_NAME or "\0" in name:
        return "an empty or overlong name"
    if "\\" in name:
        return "a backslash in its name"
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "an absolute path"
    segments = name.split("/")
    if ".." in segments:
        return "a '..' that climbs out of the archive"
    if "" in segments or "." in segments:
        return "an empty or '.' path segment"
    return None


def _check_entries(entries: list[zipfile.ZipInfo], max_unpacked: int, max_entries: int) -> None:
    if len(entries) > max_entries:
        raise UntrustedStep(
            f"the run's code archive has {len(entries)} entries, more than {max_entries}"
        )
    seen: set[str] = set()
    for info in entries:
        why = _unsafe_kind(info) or _unsafe_name(info.filename)
        if info.filename in seen:
            why = "a second entry of that name"
        if why is not None:
            raise _refuse(info.filename, why)
        seen.add(info.filename)
    declared = sum(info.file_size for info in entries)
    if declared > max_unpacked:
        raise _bomb(declared, max_unpacked)


def _bomb(size: int, max_unpacked: int) -> UntrustedStep:
    return UntrustedStep(
        f"the run's code archive unpacks to {megabytes(size)} or more, over this worker's "
        f"bound of {megabytes(max_unpacked)}"
    )


def _extract_entry(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, total: int, bound: int
) -> int:
    destination = target.joinpath(*info.filename.split("/"))
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, destination.open("xb") as out:
            # Sizes in the headers may lie: count what actually comes out.
            while chunk := source.read(_CHUNK):
                total += len(chunk)
                if total > bound:
                    raise _bomb(total, bound)
                out.write(chunk)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise _refuse(info.filename, "it overlaps another entry") from None
    return total


def check_archive(
    path: str,
    *,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> int:
    """Check the zip at ``path`` as ``extract_archive`` would, writing nothing; how many
    files it holds. ArtifactUnreadable if it is no zip, UntrustedStep for an unsafe entry."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise ArtifactUnreadable(f"the code archive is not a readable zip: {exc}") from None
    _check_entries(entries, max_unpacked, max_entries)
    return len(entries)


def extract_archive(
    path: str,
    target: Path,
    *,
    max_unpacked: int = DEFAULT_MAX_UNPACKED,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> list[str]:
    """Extract the zip at ``path`` into the empty folder ``target``; its file names.

    Every entry is checked before anything is written: only regular files, with relative
    names that stay inside ``target``, no more than ``max_entries`` of them and
    ``max_unpacked`` bytes in all. UntrustedStep names the first entry that fails.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            _check_entries(entries, max_unpacked, max_entries)
            total = 0
            for info in entries:
                total = _extract_entry(archive, info, target, total, max_unpacked)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ArtifactUnreadable(f"the run's code archive is not a readable zip: {exc}") from None
    return [info.filename for info in entries]


def _folder_name(digest: str) -> str:
    if not re.fullmatch(DIGEST_PATTERN, digest):
        raise ArtifactUnreadable(f"{digest!r} is not a digest")
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}-{hexdigest}"


class CodeCache:
    """Extracted code archives, one folder per digest, shared by the processes of a machine.

    An archive is fetched once per digest (the store verifies its bytes), extracted into a
    temporary folder beside its final place, then renamed into place: a folder under its
    digest's name is always complete, and when two processes extract the same archive at once,
    the second finds the first's folder and drops its own.
    """

    def __init__(
        self,
        store: ArtifactStore,
        directory: Path,
        *,
        max_unpacked: int = DEFAULT_MAX_UNPACKED,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._store = store
        self.directory = Path(directory).expanduser().resolve()
        self._folders = re.compile(
            re.escape(f"{self.directory}{os.sep}") + r"[a-z0-9]+-[0-9a-f]+" + re.escape(os.sep)
        )
        self._max_unpacked = max_unpacked
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._sweep()

    def shown(self, text: str) -> str:
        """``text`` (a traceback, an error) with this cache's archive folders cut from the
        paths in it: a file of a run's code reads as it is named in the project it was packed
        from (``pipes/train.py``), not as this machine's copy of it."""
        return self._folders.sub("", text)

    def extracted(self, code: BlobRef) -> Path:
        """The local folder that holds the files of the archive ``code``."""
        name = _folder_name(code.digest)
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            target = self.directory / name
            if not target.is_dir():
                self._extract(code, target)
            return target

    def _extract(self, code: BlobRef, target: Path) -> None:
        if code.size > self._max_unpacked:
            raise _bomb(code.size, self._max_unpacked)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.directory)
        )
        try:
            self._store.get(code.uri, code.digest, lambda path: self._unpack(path, staging))
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _unpack(self, path: str, staging: Path) -> list[str]:
        return extract_archive(
            path, staging, max_unpacked=self._max_unpacked, max_entries=self._max_entries
        )

    def _sweep(self) -> None:
        # Staging folders of processes that died mid-extraction; a live one is never this old.
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                continue
            try:
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_STAGING_S
            except OSError:
                continue
            if stale:
                shutil.rmtree(entry.path, ignore_errors=True)
