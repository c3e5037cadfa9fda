"""Finding outputs a ready step may reuse, and checking that they are still good.

The controller asks once per batch for every step that became ready: the latest earlier
step of the same stack that completed with the same cache key (one query for all keys), or
for a retried run the step of the same name in the run it retries. A candidate counts only
if each of its outputs is still in the artifact store with its digest intact, and was
written by the materializer version registered now; checks run in threads, concurrently. A
candidate that fails a check is a miss: the step runs, the run never fails for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.contracts import ArtifactRef, ArtifactStore
from conveyor.service.store import RunStore
from conveyor.workers import materializers
from conveyor.workers.loggers import get_logger

log = get_logger("conveyor.controller")

MAX_CHECKS_AT_ONCE = 32
"""Artifacts checked at the same time (each check reads and hashes a file)."""

StepRef = tuple[str, str]
"""(run id, step name) of a step whose outputs may be reused."""


@dataclass(frozen=True)
class Wanted:
    """A ready step: its key, the outputs it must have, and where it may find them."""

    key: str | None
    outputs: tuple[str, ...]
    use_cache: bool
    previous: tuple[StepRef, str] | None = None
    """A retried run's step of the same name (and the run that computed it), if its key
    matches: tried first, whether the cache is on or not."""


@dataclass(frozen=True)
class Hit:
    """Outputs a step reuses, and the run that computed them."""

    outputs: dict[str, ArtifactRef]
    source: str


class StepReuse:
    """Looks up and checks reusable outputs for the controller of one stack."""

    def __init__(self, runs: RunStore, store: ArtifactStore | None, stack_id: str) -> None:
        self._runs = runs
        self._store = store
        self._stack_id = stack_id
        self._versions: dict[str, str | None] = {}
        self._gate = asyncio.Semaphore(MAX_CHECKS_AT_ONCE)

    async def find(self, wanted: Sequence[Wanted]) -> list[Hit | None]:
        """For each of ``wanted``, in order, the outputs it reuses, or None (a miss)."""
        if self._store is None:
            return [None] * len(wanted)
        keys = sorted({w.key for w in wanted if w.key is not None and w.use_cache})
        cached = await self._runs.reusable(keys, self._stack_id) if keys else {}
        candidates: list[list[tuple[StepRef, str]]] = []
        for w in wanted:
            found = [w.previous] if w.previous is not None else []
            if w.use_cache and w.key in cached:
                run_id, name, origin = cached[w.key]
                found.append(((run_id, name), origin))
            candidates.append(found)
        steps = sorted({step for found in candidates for step, _ in found})
        outputs = await self._runs.step_outputs(steps) if steps else {}
        refs = {r for found in outputs.values() for r in found.values()}
        intact = dict(zip(refs, await asyncio.gather(*map(self._intact, refs)), strict=True))
        hits: list[Hit | None] = []
        for w, found in zip(wanted, candidates, strict=True):
            hit = None
            for step, origin in found:
                stored = outputs.get(step, {})
                if set(stored) == set(w.outputs) and all(intact[r] for r in stored.values()):
                    hit = Hit(outputs=stored, source=origin)
                    break
            hits.append(hit)
        return hits

    async def _intact(self, ref: ArtifactRef) -> bool:
        async with self._gate:
            return await asyncio.to_thread(self._check, ref)

    def _check(self, ref: ArtifactRef) -> bool:
        assert self._store is not None
        try:
            if ref.materializer_version != self._version(ref.materializer):
                log.info(
                    "not reused: another materializer version",
                    uri=ref.uri,
                    materializer=ref.materializer,
                    stored=ref.materializer_version,
                )
                return False
            self._store.get(ref.uri, ref.digest, lambda path: None)
        except Exception as exc:
            # Missing, corrupted, or a store that does not answer: the step runs again.
            log.info("not reused: output unreadable", uri=ref.uri, error=f"{exc}"[:500])
            return False
        return True

    def _version(self, name: str) -> str | None:
        if name not in self._versions:
            try:
                found = materializers.by_name(name, allow_pickle=True)
                self._versions[name] = str(found.version)
            except Exception:
                self._versions[name] = None  # not installed here: no reuse
        version = self._versions[name]
        if version is None:
            raise LookupError(f"materializer {name!r} is not available to the controller")
        return version
