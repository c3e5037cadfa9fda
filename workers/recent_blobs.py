"""The small outputs a worker stored last, kept in memory by their digest, so that the steps
after them on the same worker (a chain run in place, a fan-in of a thousand branches on the
embedded stack) read them without a trip to the store.

Bytes are kept only as they were hashed when stored: a read by the same digest gets the very
bytes that digest names, so nothing is verified again, and a read of any other digest goes
to the store (and is verified there).

Each is kept with the run it was stored for. Another output of that run with the same bytes
(branches of a fan-out that return equal values) takes the same reference without checking
the store again: the run's first output of those bytes checked it, and wrote the file if it
was missing or damaged. A file deleted or damaged after that is no different from one
deleted after the run. A later run checks the store again, so a step run again because its
cached output was found damaged writes it afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

from conveyor.contracts import BlobRef

LARGEST = 64 * 1024
"""A blob larger than this is not kept: a fan-in of a thousand small values fits whole."""
KEPT_BYTES = 8 * 1024 * 1024
"""At most this many bytes are kept, the oldest dropped first."""


class _Kept(NamedTuple):
    data: bytes
    blob: BlobRef
    run_id: str


class RecentBlobs:
    """Bytes by digest, up to ``KEPT_BYTES``; shared by a worker's step threads."""

    def __init__(self, kept_bytes: int = KEPT_BYTES) -> None:
        self._kept_bytes = kept_bytes
        self._size = 0
        self._blobs: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, blob: BlobRef, data: bytes, run_id: str) -> None:
        """``data``, which this worker hashed and stored as ``blob`` for the run ``run_id``."""
        if len(data) > LARGEST:
            return
        kept = _Kept(data, blob, run_id)
        with self._lock:
            known = self._blobs.get(blob.digest)
            self._blobs[blob.digest] = kept
            self._blobs.move_to_end(blob.digest)
            if known is not None:
                return
            self._size += len(data)
            while self._size > self._kept_bytes:
                _, dropped = self._blobs.popitem(last=False)
                self._size -= len(dropped.data)

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            kept = self._blobs.get(digest)
            if kept is None:
                return None
            self._blobs.move_to_end(digest)
            return kept.data

    def stored_for(self, run_id: str, digest: str) -> BlobRef | None:
        """The reference of ``digest`` if this worker stored those bytes for ``run_id``."""
        with self._lock:
            kept = self._blobs.get(digest)
        return kept.blob if kept is not None and kept.run_id == run_id else None
