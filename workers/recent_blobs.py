"""The small outputs a worker stored last, kept in memory by their digest, so that the steps
after them on the same worker (a chain run in place, a fan-in of a thousand branches on the
embedded stack) read them without a trip to the store.

Bytes are kept only as they were hashed when stored: a read by the same digest gets the very
bytes that digest names, so nothing is verified again, and a read of any other digest goes
to the store (and is verified there).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

LARGEST = 64 * 1024
"""A blob larger than this is not kept: a fan-in of a thousand small values fits whole."""
KEPT_BYTES = 8 * 1024 * 1024
"""At most this many bytes are kept, the oldest dropped first."""


class RecentBlobs:
    """Bytes by digest, up to ``KEPT_BYTES``; shared by a worker's step threads."""

    def __init__(self, kept_bytes: int = KEPT_BYTES) -> None:
        self._kept_bytes = kept_bytes
        self._size = 0
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, digest: str, data: bytes) -> None:
        """``data``, whose digest this worker computed as ``digest`` when it stored it."""
        if len(data) > LARGEST:
            return
        with self._lock:
            if digest in self._blobs:
                self._blobs.move_to_end(digest)
                return
            self._blobs[digest] = data
            self._size += len(data)
            while self._size > self._kept_bytes:
                _, dropped = self._blobs.popitem(last=False)
                self._size -= len(dropped)

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._blobs.get(digest)
            if data is not None:
                self._blobs.move_to_end(digest)
            return data
