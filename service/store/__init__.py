"""The metadata store: SQLite through aiosqlite."""

from conveyor.service.store.db import (
    Database,
    MetadataStoreError,
    Writes,
    is_store_failure,
    store_error,
)
from conveyor.service.store.runs import RunStore
from conveyor.service.store.stacks import StackStore

__all__ = [
    "Database",
    "MetadataStoreError",
    "RunStore",
    "StackStore",
    "Writes",
    "is_store_failure",
    "store_error",
]
