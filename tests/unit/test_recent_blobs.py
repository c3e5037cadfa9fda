"""The small outputs a worker keeps in memory for the steps after them
(``workers/recent_blobs.py``): bounded by bytes, oldest out first, large ones never kept, and
taken again without the store only by the run they were stored for."""

from __future__ import annotations

from conveyor.contracts import BlobRef
from conveyor.workers import digests
from conveyor.workers.recent_blobs import LARGEST, RecentBlobs

A, B, C = (digests.of_bytes(data) for data in (b"aaaa", b"bbbb", b"cccc"))
BIG, FITS = (digests.of_bytes(b"x" * size) for size in (LARGEST + 1, LARGEST))


def blob(digest: str, size: int = 4) -> BlobRef:
    return BlobRef(uri=f"file:///store/{digest.partition(':')[2]}", digest=digest, size=size)


def test_kept_bytes_come_back_by_their_digest_and_the_oldest_go_first() -> None:
    recent = RecentBlobs(kept_bytes=10)
    recent.keep(blob(A), b"aaaa", "run")
    recent.keep(blob(B), b"bbbb", "run")
    assert recent.get(A) == b"aaaa"  # read last: now the newest
    recent.keep(blob(C), b"cccc", "run")  # 12 bytes: the oldest, b, goes
    assert recent.get(B) is None and recent.stored_for("run", B) is None
    assert recent.get(A) == b"aaaa" and recent.get(C) == b"cccc"
    assert recent.get(digests.of_bytes(b"unknown")) is None


def test_a_blob_larger_than_the_largest_kept_is_not_kept() -> None:
    recent = RecentBlobs()
    recent.keep(blob(BIG, LARGEST + 1), b"x" * (LARGEST + 1), "run")
    recent.keep(blob(FITS, LARGEST), b"x" * LARGEST, "run")
    assert recent.get(BIG) is None and recent.stored_for("run", BIG) is None
    assert recent.get(FITS) == b"x" * LARGEST


def test_keeping_the_same_digest_twice_counts_its_bytes_once() -> None:
    recent = RecentBlobs(kept_bytes=8)
    recent.keep(blob(A), b"aaaa", "run")
    recent.keep(blob(A), b"aaaa", "other run")
    recent.keep(blob(B), b"bbbb", "run")  # 8 bytes: both fit
    assert recent.get(A) == b"aaaa" and recent.get(B) == b"bbbb"


def test_a_stored_blob_is_taken_again_by_the_run_it_was_stored_for_only() -> None:
    recent = RecentBlobs()
    stored = blob(A)
    recent.keep(stored, b"aaaa", "run 1")
    assert recent.stored_for("run 1", A) == stored
    # Another run checks the store itself (the file may have been damaged since).
    assert recent.stored_for("run 2", A) is None
    recent.keep(stored, b"aaaa", "run 2")  # what run 2 stored after its check
    assert recent.stored_for("run 2", A) == stored
    assert recent.stored_for("run 1", A) is None
    assert recent.stored_for("run 2", digests.of_bytes(b"other")) is None
