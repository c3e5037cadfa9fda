"""Two identical steps in flight compute once: pure bookkeeping of the cache keys being
computed now, and of the steps that wait for one of them.

The controller claims a key when it dispatches a step. Another ready step with the same key
waits instead of being dispatched; when the first finishes, its waiters are handed back: the
controller completes them from its outputs if it succeeded, and looks them up again (one of
them then computes) if it did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

StepId = tuple[str, str]
"""(run id, step name)."""


@dataclass
class InFlight:
    """The keys being computed, by whom, and who waits for each."""

    owners: dict[str, StepId] = field(default_factory=dict)
    waiters: dict[str, list[StepId]] = field(default_factory=dict)
    keys: dict[StepId, str] = field(default_factory=dict)
    """The key each owner computes (to find it when its step finishes)."""

    def claim(self, key: str, step: StepId) -> bool:
        """True: ``step`` computes ``key`` (nobody else does); False: it waits."""
        owner = self.owners.get(key)
        if owner is None or owner == step:
            self.owners[key] = step
            self.keys[step] = key
            return True
        self.waiters.setdefault(key, []).append(step)
        return False

    def finish(self, step: StepId) -> tuple[str, list[StepId]] | None:
        """``step`` finished (whatever its outcome): its key and the steps that waited for
        it, no longer waiting; None if it computed no key."""
        key = self.keys.pop(step, None)
        if key is None:
            return None
        del self.owners[key]
        return key, self.waiters.pop(key, [])
