"""Ids and timestamps of events, runs and components: no models, so that a part that only
makes records (the store, the stack rules) does not build the events (``contracts/events.py``)."""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from datetime import UTC, datetime


class _IdSource:
    """Random-looking 128-bit ids without a system call per id.

    A uuid4 reads the OS's random source each time, which costs more than the rest of an
    event here. Instead: a secret 128-bit key drawn once per process (again in a forked
    child) and a counter, hashed together. Unique across processes like a uuid4, and
    unlike a plain counter, two ids never share a prefix by construction.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.key = secrets.token_bytes(16)
        self.counter = itertools.count()

    def next(self) -> str:
        seed = next(self.counter).to_bytes(8, "little")
        return hashlib.blake2b(seed, key=self.key, digest_size=16).hexdigest()


_ids = _IdSource()


def new_id() -> str:
    """A fresh unique identifier of 32 hex digits (events, runs, components)."""
    return _ids.next()


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(UTC)
