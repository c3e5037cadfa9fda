"""A worker's code cache: it extracts an archive once per digest (across threads and
processes), refuses one that would write outside its folder or unpack too much, and shows
an archive's files in tracebacks as the project names them."""

from __future__ import annotations

import stat
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from conveyor.contracts import BlobRef, ConveyorError, UntrustedStep
from conveyor.workers import code_cache
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.code_cache import CodeCache

T = TypeVar("T")


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


class CountingStore(LocalArtifactStore):
    """A local store that counts reads and can run something in the middle of one."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0
        self.during_read: Callable[[], None] | None = None

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        self.reads += 1
        if self.during_read is not None:
            during, self.during_read = self.during_read, None
            during()
        return super().get(uri, digest, read)


def zip_blob(
    store: LocalArtifactStore, entries: list[tuple[zipfile.ZipInfo | str, bytes]]
) -> BlobRef:
    def write_zip(path: str) -> None:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for info, data in entries:
                archive.writestr(info, data)

    return store.put(write_zip)


def test_an_archive_is_extracted_once_and_reused(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    blob = zip_blob(store, [("a.py", b"A = 1\n"), ("pkg/b.py", b"B = 2\n")])
    cache = CodeCache(store, tmp_path / "cache")
    folder = cache.extracted(blob)
    assert (folder / "a.py").read_text() == "A = 1\n"
    assert (folder / "pkg" / "b.py").read_text() == "B = 2\n"
    assert cache.extracted(blob) == folder
    # Another process on the same machine finds it too.
    assert CodeCache(store, tmp_path / "cache").extracted(blob) == folder
    assert store.reads == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]


def test_two_extractions_of_one_digest_at_once_both_succeed(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    blob = zip_blob(store, [("a.py", b"A = 1\n")])
    first = CodeCache(store, tmp_path / "cache")
    second = CodeCache(store, tmp_path / "cache")
    won: list[Path] = []
    # The second process extracts, and while it does, the first one finishes the same archive.
    store.during_read = lambda: won.append(first.extracted(blob))
    folder = second.extracted(blob)
    assert won == [folder]
    assert (folder / "a.py").read_text() == "A = 1\n"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]


def test_threads_extracting_one_digest_share_one_download(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    blob = zip_blob(store, [("a.py", b"A = 1\n")])
    cache = CodeCache(store, tmp_path / "cache")
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.extracted(blob))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert len(results) == 8
    assert store.reads == 1


def symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (("../evil.py", b"x"), "climbs out"),
        (("sub/../../evil.py", b"x"), "climbs out"),
        (("/tmp/evil.py", b"x"), "absolute path"),
        (("C:/evil.py", b"x"), "absolute path"),
        (("sub\\..\\evil.py", b"x"), "backslash"),
        (symlink("link.py", "/etc/passwd"), "symbolic link"),
        (("folder/", b""), "not a regular file"),
    ],
)
def test_a_hostile_archive_is_refused(
    tmp_path: Path, store: LocalArtifactStore, entry: tuple[Any, bytes], why: str
) -> None:
    blob = zip_blob(store, [("good.py", b""), entry])
    cache = CodeCache(store, tmp_path / "work" / "cache")
    with pytest.raises(UntrustedStep, match=why):
        cache.extracted(blob)
    assert not (tmp_path / "work" / "evil.py").exists()
    assert not (tmp_path / "evil.py").exists()
    # Nothing extracted, nothing left behind: not even the good entry.
    assert list((tmp_path / "work" / "cache").iterdir()) == []


def test_a_zip_bomb_is_refused(tmp_path: Path, store: LocalArtifactStore) -> None:
    blob = zip_blob(store, [("bomb.py", b"\0" * (4 << 20))])
    assert blob.size < 100_000
    cache = CodeCache(store, tmp_path / "cache", max_unpacked=1 << 20)
    with pytest.raises(UntrustedStep, match=r"unpacks to 4.0 MB or more, over .* 1.0 MB"):
        cache.extracted(blob)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_bomb_that_lies_about_its_size_is_stopped(tmp_path: Path) -> None:
    source = tmp_path / "liar.zip"
    with zipfile.ZipFile(source, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.py", b"\0" * (4 << 20))
    data = bytearray(source.read_bytes())
    # Rewrite the declared sizes (local header and central directory) to 10 bytes.
    for offset in _size_offsets(data):
        data[offset : offset + 4] = (10).to_bytes(4, "little")
    source.write_bytes(bytes(data))
    # zipfile stops at the declared size and fails its CRC; the count would stop it anyway.
    with pytest.raises(ConveyorError):
        code_cache.extract_archive(str(source), tmp_path / "out", max_unpacked=1 << 20)
    out = tmp_path / "out" / "bomb.py"
    assert not out.exists() or out.stat().st_size <= 1 << 20


def _size_offsets(data: bytearray) -> list[int]:
    local = data.find(b"PK\x03\x04")
    central = data.find(b"PK\x01\x02")
    return [local + 22, central + 24]


def test_too_many_entries_are_refused(tmp_path: Path, store: LocalArtifactStore) -> None:
    blob = zip_blob(store, [(f"m{i}.py", b"") for i in range(20)])
    cache = CodeCache(store, tmp_path / "cache", max_entries=10)
    with pytest.raises(UntrustedStep, match="20 entries, more than 10"):
        cache.extracted(blob)


def test_a_traceback_names_an_archives_files_as_the_project_does(tmp_path: Path) -> None:
    cache = CodeCache(LocalArtifactStore(tmp_path / "store"), tmp_path / "code")
    copy = cache.directory / ("blake3-" + "ab" * 32)
    elsewhere = tmp_path / "project" / "blake3-cd" / "train.py"
    text = (
        f'  File "{copy}/pipes/train.py", line 3, in fit\n'
        f'  File "{elsewhere}", line 5, in other\n'
        f'  File "{cache.directory}/notes/readme.py", line 1, in <module>\n'
    )
    assert cache.shown(text).splitlines() == [
        '  File "pipes/train.py", line 3, in fit',
        f'  File "{elsewhere}", line 5, in other',  # not a folder of this cache's
        f'  File "{cache.directory}/notes/readme.py", line 1, in <module>',  # not an archive's
    ]
