"""Materializers and the local artifact store: round trips, integrity, containment."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from conveyor.contracts import ArtifactRef, ArtifactUnreadable, ConveyorError, OutsideStore
from conveyor.workers import digests
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.execution import load_artifact, save_artifact
from conveyor.workers.materializers import NoMaterializer


class Metrics(BaseModel):
    accuracy: float
    labels: list[str]


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True]},
        [1, "two"],
        (1, 2),
        42,
        3.5,
        None,
        "text",
        b"\x00\x01bytes",
        Metrics(accuracy=0.9, labels=["x"]),
        np.float64(2.5),
        np.int64(7),
    ],
)
def test_values_round_trip_through_a_file(store: LocalArtifactStore, value: object) -> None:
    ref = save_artifact(store, value, allow_pickle=False, what="v")
    path = Path(store.path_of(ref.uri))
    assert path.is_file() and path.is_relative_to(store.root)
    loaded = load_artifact(store, ref, allow_pickle=False)
    assert loaded == value
    assert type(loaded) is type(value)


def test_numpy_arrays_round_trip(store: LocalArtifactStore) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = save_artifact(store, array, allow_pickle=False, what="v")
    loaded = load_artifact(store, ref, allow_pickle=False)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, array)


def test_content_addressing_writes_identical_values_once(store: LocalArtifactStore) -> None:
    first = save_artifact(store, [1, 2, 3], allow_pickle=False, what="v")
    second = save_artifact(store, [1, 2, 3], allow_pickle=False, what="v")
    assert first == second
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert len(files) == 1
    assert not any(p.name.startswith(".tmp-") for p in store.root.rglob("*"))


def test_value_without_materializer_names_type_and_opt_in(store: LocalArtifactStore) -> None:
    with pytest.raises(NoMaterializer, match=r"test_artifacts\.Opaque.*allow_pickle=True"):
        save_artifact(store, Opaque(1), allow_pickle=False, what="output 'output' of step 's'")


def test_pickle_needs_opt_in_to_write_and_to_read(store: LocalArtifactStore) -> None:
    ref = save_artifact(store, Opaque(3), allow_pickle=True, what="v")
    assert ref.materializer == "pickle"
    with pytest.raises(ConveyorError, match="pickled"):
        load_artifact(store, ref, allow_pickle=False)
    assert load_artifact(store, ref, allow_pickle=True).value == 3


def test_corrupted_artifact_is_detected(store: LocalArtifactStore) -> None:
    ref = save_artifact(store, {"weights": [1, 2, 3]}, allow_pickle=False, what="v")
    Path(store.path_of(ref.uri)).write_bytes(b'{"weights": [6, 6, 6]}')
    with pytest.raises(ArtifactUnreadable, match="corrupted"):
        load_artifact(store, ref, allow_pickle=False)


def test_missing_artifact_is_a_clear_error(store: LocalArtifactStore) -> None:
    ref = save_artifact(store, "x", allow_pickle=False, what="v")
    os.remove(store.path_of(ref.uri))
    with pytest.raises(ArtifactUnreadable, match="is missing from its store") as caught:
        load_artifact(store, ref, allow_pickle=False)
    # The usual cause: a worker on another machine than the one that wrote it.
    assert str(store.root) in str(caught.value)
    assert "s3 store" in str(caught.value)


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/passwd",
        "file://{root}/../outside",
        "file://{root}/ab/../../../etc/passwd",
        "http://example.invalid/x",
        "{root}/ab/cd",
    ],
)
def test_uris_outside_the_root_are_refused(store: LocalArtifactStore, uri: str) -> None:
    read: list[str] = []
    with pytest.raises(OutsideStore):
        store.get(uri.format(root=store.root), "blake3:" + "0" * 64, read.append)
    assert read == []


def test_a_large_array_is_written_and_read_through_files(store: LocalArtifactStore) -> None:
    array = np.random.default_rng(0).random((1024, 1024))  # 8 MB
    ref = save_artifact(store, array, allow_pickle=False, what="v")
    assert ref.digest.startswith("blake3:") and ref.size > array.nbytes
    assert Path(store.path_of(ref.uri)).stat().st_size == ref.size
    assert np.array_equal(load_artifact(store, ref, allow_pickle=False), array)
    # Nothing is left in the staging folder once the file is in place.
    assert list((store.root / ".staging").iterdir()) == []


def test_a_materializer_that_fails_leaves_no_file_behind(store: LocalArtifactStore) -> None:
    def broken(path: str) -> None:
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.put(broken)
    assert list((store.root / ".staging").iterdir()) == []
    assert [p for p in store.root.iterdir() if p.name != ".staging"] == []


def test_records_written_with_a_bare_sha256_still_verify(store: LocalArtifactStore) -> None:
    ref = save_artifact(store, "old", allow_pickle=False, what="v")
    legacy = ArtifactRef.model_validate(
        {
            "uri": ref.uri,
            "sha256": hashlib.sha256(b"old").hexdigest(),
            "size": 3,
            "materializer": "str",
            "data_type": "builtins.str",
        }
    )
    assert legacy.digest.startswith("sha256:")
    assert load_artifact(store, legacy, allow_pickle=False) == "old"
    wrong = legacy.model_copy(update={"digest": "sha256:" + "0" * 64})
    with pytest.raises(ArtifactUnreadable, match="corrupted"):
        load_artifact(store, wrong, allow_pickle=False)


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(1).random(1 << 20),  # 8 MB: hashed while written
        np.arange(1 << 20, dtype=np.int32).reshape(1024, 1024),
        np.zeros((4, 1 << 20), dtype=np.float32)[:, ::2],  # not contiguous: hashed after
        np.arange(1 << 21, dtype=np.float64).reshape(1024, 2048).T,  # Fortran order
    ],
)
def test_large_arrays_are_stored_as_np_save_writes_them_under_their_true_digest(
    store: LocalArtifactStore, array: np.ndarray, tmp_path: Path
) -> None:
    ref = save_artifact(store, array, allow_pickle=False, what="v")
    path = store.path_of(ref.uri)
    np.save(tmp_path / "plain.npy", array, allow_pickle=False)
    assert Path(path).read_bytes() == (tmp_path / "plain.npy").read_bytes()
    assert digests.of_file(path) == (ref.digest, ref.size)
    assert np.array_equal(load_artifact(store, ref, allow_pickle=False), array)


def test_a_large_corrupted_file_is_detected_through_the_mapped_check(
    store: LocalArtifactStore,
) -> None:
    ref = save_artifact(store, np.ones(1 << 20), allow_pickle=False, what="v")
    with open(store.path_of(ref.uri), "r+b") as handle:
        handle.seek(ref.size - 1)
        handle.write(b"\x00")
    with pytest.raises(ArtifactUnreadable, match="corrupted"):
        load_artifact(store, ref, allow_pickle=False)


@pytest.mark.parametrize(
    "value",
    [0, -7, 2**63, True, None, 1.5, float("nan"), [1, "a"], {"k": (1, 2)}],
)
def test_json_values_are_recognised_with_or_without_the_scalar_shortcut(value: object) -> None:
    from conveyor.workers.materializers.builtin import JsonMaterializer

    assert JsonMaterializer().handles(value)


def test_json_refuses_what_it_cannot_write() -> None:
    from conveyor.workers.materializers.builtin import JsonMaterializer

    assert not JsonMaterializer().handles(10**5000)  # beyond int-to-text's digit limit
    assert not JsonMaterializer().handles([object()])
    assert not JsonMaterializer().handles("text")  # str has a materializer of its own


def test_in_memory_materializers_are_told_apart_by_class() -> None:
    from conveyor.workers.materializers import in_memory
    from conveyor.workers.materializers.builtin import JsonMaterializer
    from conveyor.workers.materializers.registry import PICKLE

    assert in_memory(JsonMaterializer())
    assert not in_memory(PICKLE)


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 16) + 1, (1 << 20) + 3])
def test_bytes_of_every_size_are_written_read_and_found_again(
    store: LocalArtifactStore, size: int
) -> None:
    data = os.urandom(size)
    ref = store.put_bytes(data)
    assert store.get_bytes(ref.uri, ref.digest) == data
    assert store.put_bytes(data) == ref  # found, not written again


@pytest.mark.parametrize("damage", ["in place", "cut short", "a link", "gone"])
def test_a_damaged_small_file_is_written_afresh_when_its_bytes_come_again(
    store: LocalArtifactStore, tmp_path: Path, damage: str
) -> None:
    """A step run again after its cached outputs were found corrupted rewrites them."""
    data = b"the output of a step"
    ref = store.put_bytes(data)
    path = Path(store.path_of(ref.uri))
    if damage == "in place":
        path.write_bytes(b"X" * len(data))
    elif damage == "cut short":
        path.write_bytes(data[:-1])
    elif damage == "a link":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_bytes(data)
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.unlink()
    with pytest.raises(ArtifactUnreadable):
        store.get_bytes(ref.uri, ref.digest)
    assert store.put_bytes(data) == ref
    assert not path.is_symlink()
    assert store.get_bytes(ref.uri, ref.digest) == data
