"""The small outputs a worker keeps in memory for the steps after them
(``workers/recent_blobs.py``): bounded by bytes, oldest out first, large ones never kept."""

from __future__ import annotations

from conveyor.workers.recent_blobs import LARGEST, RecentBlobs


def test_kept_bytes_come_back_by_their_digest_and_the_oldest_go_first() -> None:
    recent = RecentBlobs(kept_bytes=10)
    recent.keep("d:a", b"aaaa")
    recent.keep("d:b", b"bbbb")
    assert recent.get("d:a") == b"aaaa"  # read last: now the newest
    recent.keep("d:c", b"cccc")  # 12 bytes: the oldest, b, goes
    assert recent.get("d:b") is None
    assert recent.get("d:a") == b"aaaa" and recent.get("d:c") == b"cccc"
    assert recent.get("d:unknown") is None


def test_a_blob_larger_than_the_largest_kept_is_not_kept() -> None:
    recent = RecentBlobs()
    recent.keep("d:big", b"x" * (LARGEST + 1))
    recent.keep("d:fits", b"x" * LARGEST)
    assert recent.get("d:big") is None
    assert recent.get("d:fits") == b"x" * LARGEST


def test_keeping_the_same_digest_twice_counts_its_bytes_once() -> None:
    recent = RecentBlobs(kept_bytes=8)
    recent.keep("d:a", b"aaaa")
    recent.keep("d:a", b"aaaa")
    recent.keep("d:b", b"bbbb")  # 8 bytes: both fit
    assert recent.get("d:a") == b"aaaa" and recent.get("d:b") == b"bbbb"
