"""Content digests of stored bytes: blake3 for everything written, sha256 for older records.

A digest is written ``algorithm:hex``. blake3 is a cryptographic hash, so content addresses
stay collision-free, and it hashes several times faster than sha256, which kept verifying
every read from costing more than the read itself.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import blake3

from conveyor.contracts import ArtifactUnreadable

ALGORITHM = "blake3"
CHUNK = 4 << 20
"""Bytes read per call when hashing a file: large enough for speed, small next to memory."""
MAPPED_MIN = 4 << 20
"""Files from this size on are verified through a memory map, on every core."""


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = ALGORITHM) -> Hasher:
    """A hasher of ``algorithm`` (``blake3`` or ``sha256``)."""
    if algorithm == "blake3":
        return blake3.blake3()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ArtifactUnreadable(f"unknown digest algorithm {algorithm!r}")


def split(digest: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a digest."""
    algorithm, sep, hexdigest = digest.partition(":")
    if not sep or not hexdigest:
        raise ArtifactUnreadable(f"{digest!r} is not a digest (expected algorithm:hex)")
    return algorithm, hexdigest


def of_bytes(data: bytes | memoryview) -> str:
    """The digest of ``data``."""
    hasher = new_hasher()
    hasher.update(data)
    return f"{ALGORITHM}:{hasher.hexdigest()}"


def of_file(path: str, algorithm: str = ALGORITHM) -> tuple[str, int]:
    """The digest and size of the file at ``path``, read in chunks (never whole in memory)."""
    hasher = new_hasher(algorithm)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        # No bigger a buffer than the file needs: most artifacts are small.
        buffer = bytearray(min(CHUNK, os.fstat(handle.fileno()).st_size + 1))
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return f"{algorithm}:{hasher.hexdigest()}", size


def _of_mapped_file(path: str, algorithm: str) -> str:
    if algorithm != "blake3" or os.path.getsize(path) < MAPPED_MIN:
        return of_file(path, algorithm)[0]
    # Hashing the mapped file on both cores skips copying it through a buffer. The mapping
    # counts towards resident memory only until it is unmapped, before the caller loads.
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    hasher.update_mmap(path)
    return f"blake3:{hasher.hexdigest()}"


def alongside(write: Callable[[], None], parts: Sequence[bytes | memoryview]) -> str:
    """Call ``write()`` while another thread hashes ``parts`` (what it writes, in memory);
    the digest of ``parts`` joined. blake3 lets go of the GIL, so both run at once."""
    hasher = blake3.blake3()
    with ThreadPoolExecutor(1, thread_name_prefix="conveyor-hash") as pool:
        hashed = pool.submit(lambda: [hasher.update(part) for part in parts])
        write()
        hashed.result()
    return f"{ALGORITHM}:{hasher.hexdigest()}"


def require(uri: str, digest: str, actual: str) -> None:
    """Raise ArtifactUnreadable unless ``actual``, the hex digest of the bytes read with
    ``digest``'s algorithm, is the one ``digest`` names."""
    algorithm, expected = split(digest)
    if actual != expected:
        raise ArtifactUnreadable(
            f"artifact {uri} is corrupted: its {algorithm} is {actual[:12]}..., "
            f"expected {expected[:12]}..."
        )


def verify_bytes(data: bytes, digest: str, uri: str) -> None:
    """Raise ArtifactUnreadable unless ``data`` has ``digest``."""
    hasher = new_hasher(split(digest)[0])
    hasher.update(data)
    require(uri, digest, hasher.hexdigest())


def verify_file(path: str, digest: str, uri: str) -> None:
    """Raise ArtifactUnreadable unless the file at ``path`` has ``digest``."""
    algorithm = split(digest)[0]
    try:
        actual = _of_mapped_file(path, algorithm)
    except FileNotFoundError:
        raise ArtifactUnreadable(f"artifact {uri} is missing from its store") from None
    except OSError as exc:
        raise ArtifactUnreadable(f"cannot read artifact {uri}: {exc.strerror}") from None
    require(uri, digest, split(actual)[1])
