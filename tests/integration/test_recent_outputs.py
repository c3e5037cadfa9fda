"""A worker keeps the small outputs it stored last in memory (``workers/recent_blobs.py``):
the steps after them on the same worker read them from there, not from the store; what it
did not store itself comes from the store, verified."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from conveyor import Conveyor, RunStatus, pipeline, step
from conveyor.contracts import BlobRef
from conveyor.workers import digests
from conveyor.workers.artifact_store_local import LocalArtifactStore


@step
def seed() -> int:
    return 7


@step
def branch(x: int, i: int) -> int:
    return x + i


@step
def gather(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def fan_in(n: int) -> None:
    root = seed()
    gather([branch(root, i) for i in range(n)])


@pytest.fixture
def store_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digests of the blobs read from a local store's files."""
    reads: list[str] = []
    plain = LocalArtifactStore.get_bytes

    def counted(self: LocalArtifactStore, uri: str, digest: str) -> bytes:
        reads.append(digest)
        return plain(self, uri, digest)

    monkeypatch.setattr(LocalArtifactStore, "get_bytes", counted)
    return reads


async def test_a_fan_in_reads_what_its_worker_stored_from_memory(store_reads: list[str]) -> None:
    async with Conveyor() as cv:
        run = await cv.submit(fan_in, n=50, cache=False)
        assert (await run.wait(timeout=60)).status is RunStatus.COMPLETED
        # 100 reads of the store without it: each branch's input, and the 50 of the join.
        assert store_reads == []
        assert await run.load("gather") == 50 * 7 + sum(range(50))


@step(cache=False)
def gather_again(xs: list[int]) -> int:
    return sum(xs)


@pipeline
def fan_in_joined_again(n: int) -> None:
    root = seed()
    gather_again([branch(root, i) for i in range(n)])


async def test_outputs_another_worker_stored_are_read_from_the_store(
    store_reads: list[str],
) -> None:
    async with Conveyor() as cv:
        first = await cv.submit(fan_in_joined_again, n=5)
        assert (await first.wait(timeout=60)).status is RunStatus.COMPLETED
    assert store_reads == []
    async with Conveyor() as cv:  # another worker pool, which stored nothing
        again = await cv.submit(fan_in_joined_again, n=5)
        assert (await again.wait(timeout=60)).status is RunStatus.COMPLETED
        # The branches are reused (cached); the join runs again, on their stored outputs.
        assert len(store_reads) == 5
        assert await again.load("gather_again") == 5 * 7 + sum(range(5))


@step
def same(x: int) -> int:
    return x * 0 + 1


@pipeline
def fan_out_of_equal_values(n: int) -> None:
    root = seed()
    gather([same(root) for _ in range(n)])


async def test_equal_outputs_of_a_run_check_the_store_once_and_a_later_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored: list[str] = []
    plain = LocalArtifactStore.put_bytes

    def counted(self: LocalArtifactStore, data: bytes) -> BlobRef:
        stored.append(digests.of_bytes(data))
        return plain(self, data)

    monkeypatch.setattr(LocalArtifactStore, "put_bytes", counted)
    one = digests.of_bytes(b"1")
    async with Conveyor() as cv:
        first = await cv.submit(fan_out_of_equal_values, n=40, cache=False)
        assert (await first.wait(timeout=60)).status is RunStatus.COMPLETED
        # 40 branches store the same bytes: those that ran before any of them was stored
        # (one a slot) check the store, the others take the reference found.
        assert 1 <= stored.count(one) <= 4
        steps = {s.name: s for s in await first.steps()}
        path = Path(urlparse(steps["same_2"].outputs["output"].uri).path)
        path.write_bytes(b"2")  # damaged in place, its size kept

        stored.clear()
        again = await cv.submit(fan_out_of_equal_values, n=40, cache=False)
        assert (await again.wait(timeout=60)).status is RunStatus.COMPLETED
        # Another run checks the store: the damaged file is written afresh.
        assert 1 <= stored.count(one) <= 4
        assert path.read_bytes() == b"1"
        assert await again.load("gather") == 40
