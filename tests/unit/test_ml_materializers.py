"""The optional materializers through a local artifact store: frames, paths, containers;
hostile path archives and container manifests; the bounds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars
import pyarrow
import pytest
import torch

from conveyor.contracts import ArtifactRef, ConveyorError
from conveyor.workers import digests
from conveyor.workers.artifact_store_local import LocalArtifactStore
from conveyor.workers.execution import load_artifact, save_artifact
from conveyor.workers.materializers import NoMaterializer, paths
from conveyor.workers.materializers.paths import PathRefused


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def round_trip(store: LocalArtifactStore, value: object) -> tuple[ArtifactRef, Any]:
    ref = save_artifact(store, value, allow_pickle=False, what="value")
    return ref, load_artifact(store, ref, allow_pickle=False)


def test_a_series_keeps_its_name_index_and_dtype(store: LocalArtifactStore) -> None:
    series = pd.Series([1.5, None, 3.0], index=["a", "b", "c"], name="score")
    ref, back = round_trip(store, series)
    assert ref.materializer == "pandas.series"
    pd.testing.assert_series_equal(back, series)


def test_arrow_tables_and_polars_frames_are_parquet(store: LocalArtifactStore) -> None:
    table = pyarrow.table({"a": [1, 2], "b": ["x", None]})
    ref, back = round_trip(store, table)
    assert ref.materializer == "pyarrow.table" and back.equals(table)
    frame = polars.DataFrame({"a": [1, 2, 3], "b": [0.5, None, 2.0]})
    ref, back = round_trip(store, frame)
    assert ref.materializer == "polars.dataframe" and back.equals(frame)
    assert store.get(ref.uri, ref.digest, lambda p: Path(p).read_bytes()[:4]) == b"PAR1"


def test_a_frame_parquet_cannot_hold_is_refused_clearly(store: LocalArtifactStore) -> None:
    with pytest.raises(ConveyorError, match="Parquet cannot hold"):
        save_artifact(store, pd.DataFrame({1: [1]}), allow_pickle=False, what="value")


def test_a_tensor_that_is_a_view_and_a_parameter_come_back_as_tensors(
    store: LocalArtifactStore,
) -> None:
    view = torch.arange(20.0).reshape(4, 5)[:, 1]  # not contiguous
    assert torch.equal(round_trip(store, view)[1], view)
    ref, back = round_trip(store, torch.nn.Parameter(torch.ones(2)))
    assert ref.materializer == "torch.tensor" and torch.equal(back, torch.ones(2))


def test_tied_weights_in_a_state_dict_are_stored(store: LocalArtifactStore) -> None:
    shared = torch.ones(3)
    ref, back = round_trip(store, {"a": shared, "b": shared})
    assert ref.materializer == "torch.state_dict"
    assert torch.equal(back["a"], shared) and torch.equal(back["b"], shared)


def test_a_file_comes_back_as_a_local_copy(store: LocalArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00\x01" * 100)
    source.chmod(0o755)
    ref, back = round_trip(store, source)
    assert ref.materializer == "path" and ref.data_type == "pathlib.PosixPath"
    assert back.name == "weights.bin" and back.read_bytes() == source.read_bytes()
    assert back != source and back.stat().st_mode & 0o100


def test_an_empty_directory_comes_back(store: LocalArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _, back = round_trip(store, tmp_path / "empty")
    assert back.is_dir() and list(back.iterdir()) == []


def test_a_symlink_or_a_missing_path_is_refused(store: LocalArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(PathRefused, match="link is a symbolic link"):
        save_artifact(store, tmp_path / "link", allow_pickle=False, what="value")
    with pytest.raises(PathRefused, match="does not exist"):
        save_artifact(store, tmp_path / "gone", allow_pickle=False, what="value")


def test_a_tree_beyond_the_bounds_is_refused(
    store: LocalArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index in range(5):
        (tmp_path / "many").mkdir(exist_ok=True)
        (tmp_path / "many" / str(index)).write_text("x")
    monkeypatch.setattr(paths, "MAX_ENTRIES", 3)
    with pytest.raises(PathRefused, match="more than 3 entries"):
        save_artifact(store, tmp_path / "many", allow_pickle=False, what="value")


def stored_archive(store: LocalArtifactStore, members: list[tarfile.TarInfo]) -> ArtifactRef:
    """A hand-made path archive, put in the store as the path materializer would."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    blob = store.put_bytes(buffer.getvalue())
    return ArtifactRef.of(blob, materializer="path", version="1", data_type="pathlib.PosixPath")


def member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([member("top", tarfile.DIRTYPE), member("top/../../evil")], "escapes"),
        ([member("/etc/evil")], "escapes"),
        ([member("top", tarfile.DIRTYPE), member("other/x")], "escapes"),
        ([member("top", tarfile.DIRTYPE), member("top/l", tarfile.SYMTYPE, link="/etc")], "link"),
        ([member("top", tarfile.DIRTYPE), member("top/h", tarfile.LNKTYPE, link="top")], "link"),
        ([member("..", tarfile.DIRTYPE)], "escapes"),
    ],
)
def test_an_archive_member_that_escapes_or_links_is_refused_before_anything_is_written(
    store: LocalArtifactStore, members: list[tarfile.TarInfo], why: str, tmp_path: Path
) -> None:
    ref = stored_archive(store, members)
    with pytest.raises(PathRefused, match=why):
        load_artifact(store, ref, allow_pickle=False)
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_an_archive_beyond_the_size_bound_is_refused(
    store: LocalArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = stored_archive(store, [member("top", tarfile.DIRTYPE), member("top/big", size=2048)])
    monkeypatch.setattr(paths, "MAX_BYTES", 1024)
    with pytest.raises(PathRefused, match="more than"):
        load_artifact(store, ref, allow_pickle=False)


def test_containers_nest_and_keep_their_kind(store: LocalArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("hello")
    value = {
        "pair": (np.arange(3), "text"),
        "frames": [pd.DataFrame({"a": [1]}), {"inner": torch.zeros(2)}],
        "file": tmp_path / "f.txt",
        "plain": {"k": [1, 2]},
    }
    ref, back = round_trip(store, value)
    assert ref.materializer == "container" and list(back) == list(value)
    assert isinstance(back["pair"], tuple) and back["pair"][1] == "text"
    np.testing.assert_array_equal(back["pair"][0], np.arange(3))
    pd.testing.assert_frame_equal(back["frames"][0], value["frames"][0])  # type: ignore[index]
    assert torch.equal(back["frames"][1]["inner"], torch.zeros(2))
    assert back["file"].read_text() == "hello" and back["plain"] == {"k": [1, 2]}


def test_a_container_of_json_values_stays_json(store: LocalArtifactStore) -> None:
    assert round_trip(store, [1, {"a": None}])[0].materializer == "json"


def test_a_container_with_an_unstorable_item_names_it(store: LocalArtifactStore) -> None:
    with pytest.raises(
        NoMaterializer, match=r"is a list whose item '1' is a tests\.unit\.\S+Opaque"
    ):
        save_artifact(store, [pd.DataFrame(), Opaque()], allow_pickle=False, what="value")
    with pytest.raises(NoMaterializer, match=r"a dict with a key of type builtins\.int"):
        save_artifact(store, {1: pd.DataFrame()}, allow_pickle=False, what="value")


class Opaque:
    pass


@pytest.mark.parametrize(
    "manifest",
    [b"not json", b"[]", json.dumps({"kind": "set", "items": []}).encode()],
)
def test_a_malformed_container_manifest_is_one_clear_error(
    store: LocalArtifactStore, manifest: bytes
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
    blob = store.put_bytes(buffer.getvalue())
    ref = ArtifactRef.of(blob, materializer="container", version="1", data_type="builtins.list")
    with pytest.raises(ConveyorError, match="stored container is malformed"):
        load_artifact(store, ref, allow_pickle=False)


def test_a_container_never_pickles_an_item(store: LocalArtifactStore) -> None:
    ref = save_artifact(store, [torch.ones(1), Opaque()], allow_pickle=True, what="value")
    assert ref.materializer == "pickle"  # the whole value, as the step asked; not per item
    assert digests.split(ref.digest)[0]


def test_a_container_beyond_its_item_bound_says_so(store: LocalArtifactStore) -> None:
    with pytest.raises(NoMaterializer, match="a list of more than 10000 items"):
        save_artifact(store, [np.float32(1)] * 10_001, allow_pickle=False, what="value")
