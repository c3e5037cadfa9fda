"""The outbox: events a service controller recorded with the state changes they announce,
in the same transaction, until the broker confirmed them (republished after a crash)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from conveyor.service.store.db import Database, Writes

if TYPE_CHECKING:
    from conveyor.contracts import Event


class Outbox:
    """The ``outbox`` table. Writes join a batch's :class:`Writes`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, writes: Writes, stack_id: str, events: Sequence[Event], now: datetime) -> None:
        """Record events to publish, in order."""
        created = now.isoformat()
        writes.add(
            "INSERT INTO outbox (event_id, run_id, stack_id, event, created) VALUES (?,?,?,?,?)",
            # As text at once: a join's StepReady of 100,000 inputs is megabytes, not worth
            # holding as bytes and as text.
            ((e.event_id, e.run_id, stack_id, e.model_dump_json(), created) for e in events),
        )

    def mark_sent(self, writes: Writes, event_ids: Iterable[str], now: datetime) -> None:
        """Record that the broker confirmed these events."""
        sent = now.isoformat()
        writes.add("UPDATE outbox SET sent = ? WHERE event_id = ?", ((sent, i) for i in event_ids))

    async def unsent(self, stack_id: str) -> list[Event]:
        """Events recorded but never confirmed, oldest first."""
        from conveyor.contracts import parse_event  # builds the event models: only here

        rows = await self.db.fetchall(
            "SELECT event FROM outbox WHERE stack_id = ? AND sent IS NULL ORDER BY seq",
            (stack_id,),
        )
        return [parse_event(row["event"]) for row in rows]
