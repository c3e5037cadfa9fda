"""The metadata store: SQLite through aiosqlite."""

from conveyor.service.store.db import Database, Writes
from conveyor.service.store.runs import RunStore
from conveyor.service.store.stacks import StackStore

__all__ = ["Database", "RunStore", "StackStore", "Writes"]
