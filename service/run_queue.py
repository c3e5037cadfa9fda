"""The run queue of an embedded controller: runs start in the order they were requested, at
most ``limit`` at once; the requests beyond it wait, unsettled, until runs end.

An embedded controller shares its process, and its event loop, with the worker pool: a
hundred runs requested at once, all started at once, would make the first of them wait for
the controller to record and dispatch the other ninety-nine, and then share the pool with
them, so that all finish together near the end. Started a few at a time, the first ones
finish first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from conveyor.contracts import RunCancelRequested, RunRequested
from conveyor.service.unreadable import Inbound


class RunQueue:
    """The run requests waiting for room, oldest first."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit  # None: no limit, every request starts at once
        self._waiting: deque[Inbound] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def has_room(self, active: int) -> bool:
        """Whether a request waits that may start now that ``active`` runs are going."""
        return bool(self._waiting) and (self.limit is None or active < self.limit)

    def admit(
        self, deliveries: Sequence[Inbound], active: int
    ) -> tuple[list[Inbound], list[Inbound]]:
        """What a batch takes of ``deliveries`` with ``active`` runs going: the requests
        that fit under the limit (those that waited first), those whose run the batch
        cancels (recorded cancelled, never started), then every other event. Also the
        requests of ``deliveries`` that wait."""
        if self.limit is None:
            return list(deliveries), []
        taken: list[Inbound] = []
        came: list[Inbound] = []
        for delivery in deliveries:
            (came if isinstance(delivery.event, RunRequested) else taken).append(delivery)
        self._waiting.extend(came)
        cancelled = {d.event.run_id for d in taken if isinstance(d.event, RunCancelRequested)}
        room = self.limit - active
        started: list[Inbound] = []
        if cancelled:  # rare: the whole queue is looked through
            kept: deque[Inbound] = deque()
            for delivery in self._waiting:
                if delivery.event.run_id in cancelled:
                    started.append(delivery)
                elif room > 0:
                    started.append(delivery)
                    room -= 1
                else:
                    kept.append(delivery)
            self._waiting = kept
        else:  # the oldest, without a look at the rest (thousands may wait)
            while self._waiting and len(started) < room:
                started.append(self._waiting.popleft())
        gone = {id(d) for d in started}
        return started + taken, [d for d in came if id(d) not in gone]

    def take_all(self) -> list[Inbound]:
        """Every request waiting (the controller stops: they are handed back)."""
        waiting, self._waiting = list(self._waiting), deque()
        return waiting
