"""The metadata store: SQLite through aiosqlite."""

from conveyor.service.store.artifacts import ArtifactRecords
from conveyor.service.store.db import (
    Database,
    MetadataStoreError,
    Writes,
    is_store_failure,
    store_error,
)
from conveyor.service.store.outbox import Outbox
from conveyor.service.store.owned_runs import OwnedRuns
from conveyor.service.store.run_requests import RunRequests
from conveyor.service.store.runs import RunStore
from conveyor.service.store.stacks import StackStore
from conveyor.service.store.users import UserStore

__all__ = [
    "ArtifactRecords",
    "Database",
    "MetadataStoreError",
    "Outbox",
    "OwnedRuns",
    "RunRequests",
    "RunStore",
    "StackStore",
    "UserStore",
    "Writes",
    "is_store_failure",
    "store_error",
]
