"""The ``s3`` artifact store against a real S3 HTTP endpoint (moto's server).

What a user relies on: bytes come back as they went in, named by their content; anything
corrupted, missing or outside the store is refused; and a store that cannot be used says
which bucket at which endpoint, and what to check.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import blake3
import obstore
import pytest
from obstore.exceptions import GenericError, PermissionDeniedError

from conveyor.contracts import ArtifactUnreadable, ComponentType, StoreUnavailable
from conveyor.service.context import Services
from conveyor.workers import digests
from conveyor.workers.artifact_store_s3 import S3ArtifactStore
from conveyor.workers.s3_config import S3ArtifactStoreConfig, resolve_credentials
from tests.integration.api_helpers import serving, submit, wait_status
from tests.s3_support import AuthServer, S3Bucket, auth_server, unused_endpoint

PREFIX = "runs/one"
MB = 1 << 20


def make_store(endpoint: str, bucket: str, **config: Any) -> S3ArtifactStore:
    return S3ArtifactStore(S3ArtifactStoreConfig(bucket=bucket, endpoint_url=endpoint, **config))


@pytest.fixture
def store(s3_bucket: S3Bucket) -> S3ArtifactStore:
    return make_store(s3_bucket.endpoint, s3_bucket.bucket, prefix=PREFIX)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the store's temporary files go to, watched by the test."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size // MB):
            handle.write(os.urandom(MB))
        handle.write(os.urandom(size % MB))


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def hex_of(digest: str) -> str:
    return digests.split(digest)[1]


# --- bytes in, the same bytes out ----------------------------------------------------


def test_small_bytes_round_trip_under_their_content_address(
    store: S3ArtifactStore, s3_bucket: S3Bucket
) -> None:
    data = b"a step output"
    ref = store.put_bytes(data)
    hexdigest = hex_of(ref.digest)
    assert ref.digest == digests.of_bytes(data) and ref.size == len(data)
    assert ref.uri == f"s3://{s3_bucket.bucket}/{PREFIX}/{hexdigest[:2]}/{hexdigest}"
    stored = s3_bucket.client().get_object(
        Bucket=s3_bucket.bucket, Key=f"{PREFIX}/{hexdigest[:2]}/{hexdigest}"
    )
    assert stored["Body"].read() == data
    assert store.get(ref.uri, ref.digest, read_bytes) == data


def test_a_file_of_tens_of_megabytes_round_trips_in_parts(
    store: S3ArtifactStore, s3_bucket: S3Bucket, scratch: Path
) -> None:
    size = 40 * MB + 12345
    ref = store.put(lambda path: write_random(path, size))
    assert ref.size == size
    key = ref.uri.removeprefix(f"s3://{s3_bucket.bucket}/")
    head = s3_bucket.client().head_object(Bucket=s3_bucket.bucket, Key=key)
    assert head["ContentLength"] == size
    # An ETag "md5-N" is S3's mark of an object uploaded in N parts.
    assert head["ETag"].strip('"').rpartition("-")[2].isdigit(), head["ETag"]
    got = store.get(ref.uri, ref.digest, lambda path: digests.of_file(path))
    assert got == (ref.digest, size)
    assert list(scratch.iterdir()) == []


def test_the_same_bytes_are_one_object(store: S3ArtifactStore, s3_bucket: S3Bucket) -> None:
    data = os.urandom(1000)
    first = store.put_bytes(data)
    again = store.put_bytes(data)

    def write(path: str) -> None:
        Path(path).write_bytes(data)

    from_file = store.put(write)
    assert first == again == from_file
    assert len(s3_bucket.keys()) == 1
    other = store.put_bytes(data + b"!")
    assert other.uri != first.uri and len(s3_bucket.keys()) == 2


def test_a_large_object_stored_twice_is_one_object(
    store: S3ArtifactStore, s3_bucket: S3Bucket
) -> None:
    data = os.urandom(9 * MB)

    def write(path: str) -> None:
        Path(path).write_bytes(data)

    first, again = store.put(write), store.put(write)
    assert first == again
    assert s3_bucket.keys() == [first.uri.removeprefix(f"s3://{s3_bucket.bucket}/")]


def test_read_may_return_an_open_file_that_outlives_the_temporary_file(
    store: S3ArtifactStore, scratch: Path
) -> None:
    ref = store.put_bytes(b"streamed later")
    handle = store.get(ref.uri, ref.digest, lambda path: open(path, "rb"))  # noqa: SIM115
    with handle:
        assert list(scratch.iterdir()) == []
        assert handle.read() == b"streamed later"


def test_temporary_files_are_removed_when_writing_fails(
    store: S3ArtifactStore, s3_bucket: S3Bucket, scratch: Path
) -> None:
    def failing(path: str) -> None:
        Path(path).write_bytes(b"half")
        raise RuntimeError("the materializer broke")

    with pytest.raises(RuntimeError, match="materializer broke"):
        store.put(failing)
    assert list(scratch.iterdir()) == []
    assert s3_bucket.keys() == []


# --- corrupted, missing, outside -------------------------------------------------------


def test_a_corrupted_object_is_refused(store: S3ArtifactStore, s3_bucket: S3Bucket) -> None:
    ref = store.put_bytes(b"the original bytes")
    key = ref.uri.removeprefix(f"s3://{s3_bucket.bucket}/")
    s3_bucket.client().put_object(Bucket=s3_bucket.bucket, Key=key, Body=b"the altered bytes")
    with pytest.raises(ArtifactUnreadable, match="corrupted") as caught:
        store.get(ref.uri, ref.digest, read_bytes)
    assert ref.uri in str(caught.value) and not caught.value.retryable


def test_a_deleted_object_is_missing(store: S3ArtifactStore, s3_bucket: S3Bucket) -> None:
    ref = store.put_bytes(b"soon gone")
    key = ref.uri.removeprefix(f"s3://{s3_bucket.bucket}/")
    s3_bucket.client().delete_object(Bucket=s3_bucket.bucket, Key=key)
    with pytest.raises(ArtifactUnreadable, match="missing") as caught:
        store.get(ref.uri, ref.digest, read_bytes)
    assert ref.uri in str(caught.value) and s3_bucket.bucket in str(caught.value)


def outside_uris(bucket: str, hexdigest: str) -> list[str]:
    name = f"{hexdigest[:2]}/{hexdigest}"
    return [
        f"s3://other-bucket/{PREFIX}/{name}",
        f"s3://{bucket}x/{PREFIX}/{name}",
        f"s3://{bucket}/runs/two/{name}",
        f"s3://{bucket}/{name}",
        f"s3://{bucket}/{PREFIX}/../two/{name}",
        f"s3://{bucket}/{PREFIX}/sub/{name}",
        f"s3://{bucket}/{PREFIX}/{hexdigest[:2]}/{'g' * 64}",
        f"s3://{bucket}/{PREFIX}/{hexdigest[:2]}/{hexdigest.upper()}",
        f"s3://{bucket}/{PREFIX}/ff/{'0' * 64}" if hexdigest[:2] != "ff" else "s3://x",
        f"s3://{bucket}/{PREFIX}/{name}/..",
        f"s3://{bucket}/{PREFIX}/{name}?versionId=1",
        f"S3://{bucket}/{PREFIX}/{name}",
        "file:///etc/passwd",
        f"https://{bucket}.s3.amazonaws.com/{PREFIX}/{name}",
    ]


def test_uris_outside_the_bucket_and_prefix_are_refused_without_a_request(
    store: S3ArtifactStore, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = store.put_bytes(b"inside")

    def no_request(*args: object, **kwargs: object) -> None:
        raise AssertionError("the store sent a request for a uri it should refuse")

    monkeypatch.setattr(obstore, "get", no_request)
    monkeypatch.setattr(obstore, "head", no_request)
    for uri in outside_uris(s3_bucket.bucket, hex_of(ref.digest)):
        with pytest.raises(ArtifactUnreadable, match="not an object of the s3 artifact store"):
            store.get(uri, ref.digest, read_bytes)


# --- a store that cannot be used -------------------------------------------------------


def test_a_missing_bucket_is_named_with_its_endpoint(s3_bucket: S3Bucket) -> None:
    missing = make_store(s3_bucket.endpoint, "conveyor-no-such-bucket")
    calls: dict[str, Callable[[], object]] = {
        "check": missing.check,
        "put_bytes": lambda: missing.put_bytes(b"x"),
        "put": lambda: missing.put(lambda path: write_random(path, 9 * MB)),
    }
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable) as caught:
            call()
        message = str(caught.value)
        assert "'conveyor-no-such-bucket'" in message, (name, message)
        assert s3_bucket.endpoint in message and "does not exist" in message, (name, message)
        assert "Traceback" not in message and "Debug source" not in message, (name, message)
        assert not caught.value.retryable, name
    present = make_store(s3_bucket.endpoint, s3_bucket.bucket)
    ref = present.put_bytes(b"x")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        missing.get(
            ref.uri.replace(s3_bucket.bucket, "conveyor-no-such-bucket"), ref.digest, read_bytes
        )


def test_check_passes_on_a_usable_bucket(store: S3ArtifactStore, s3_bucket: S3Bucket) -> None:
    store.check()
    assert (
        store.location == f"bucket {s3_bucket.bucket!r} (prefix {PREFIX!r}) at {s3_bucket.endpoint}"
    )
    assert s3_bucket.keys() == []


def test_an_unreachable_endpoint_fails_fast_and_may_be_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = unused_endpoint()
    store = make_store(endpoint, "some-bucket")
    for call in (store.check, lambda: store.put_bytes(b"x")):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            call()
        elapsed = time.monotonic() - started
        message = str(caught.value)
        assert "'some-bucket'" in message and endpoint in message and "does not answer" in message
        assert caught.value.retryable
        assert elapsed < 10, f"took {elapsed:.1f}s to give up on a refused connection"


# --- credentials -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth() -> Iterator[AuthServer]:
    with auth_server() as server:
        yield server


def clear_aws_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))


def test_refused_keys_are_reported_and_not_retried(
    auth: AuthServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clear_aws_env(monkeypatch, tmp_path)
    good = make_store(
        auth.endpoint, auth.bucket, access_key_id=auth.key, secret_access_key=auth.secret
    )
    good.check()
    ref = good.put_bytes(b"signed")
    assert good.get(ref.uri, ref.digest, read_bytes) == b"signed"
    wrong_secret = "w" * 40
    for key in (auth.key, "AKIAUNKNOWNUNKNOWN00"):
        bad = make_store(
            auth.endpoint, auth.bucket, access_key_id=key, secret_access_key=wrong_secret
        )
        for call in (bad.check, partial(bad.put_bytes, b"x")):
            with pytest.raises(StoreUnavailable, match="access key was refused") as caught:
                call()
            message = str(caught.value)
            assert auth.bucket in message and auth.endpoint in message
            assert "keys from the component's access_key_id" in message
            assert wrong_secret not in message and not caught.value.retryable


def test_keys_of_a_profile_reach_the_server(
    auth: AuthServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clear_aws_env(monkeypatch, tmp_path)
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text(
        f"[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n\n"
        f"[ci]\naws_access_key_id = {auth.key}\naws_secret_access_key = {auth.secret}\n"
    )
    make_store(auth.endpoint, auth.bucket, profile="ci").check()
    monkeypatch.setenv("AWS_PROFILE", "ci")
    make_store(auth.endpoint, auth.bucket).check()
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(StoreUnavailable, match="access key was refused") as caught:
        make_store(auth.endpoint, auth.bucket).check()
    assert "keys from profile 'default'" in str(caught.value)


def config(**fields: Any) -> S3ArtifactStoreConfig:
    return S3ArtifactStoreConfig(bucket="a-bucket", **fields)


def write_credentials(path: Path) -> None:
    path.write_text(
        "[default]\naws_access_key_id = default-key\naws_secret_access_key = default-secret\n\n"
        "[ci]\naws_access_key_id = ci-key\naws_secret_access_key = ci-secret\n"
        "aws_session_token = ci-token\n\n[broken]\naws_access_key_id = only-half\n"
    )


def keys(cfg: S3ArtifactStoreConfig, environ: dict[str, str]) -> tuple[str | None, ...] | None:
    """What the chain found: (key id, secret, token), or None."""
    found = resolve_credentials(cfg, environ)
    if found is None:
        return None
    return (found.access_key_id, found.secret_access_key, found.session_token)


def test_the_credential_chain_takes_fields_then_profile_then_environment(tmp_path: Path) -> None:
    file = tmp_path / "credentials"
    write_credentials(file)
    env_keys = {"AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    files = {"AWS_SHARED_CREDENTIALS_FILE": str(file)}
    explicit = config(access_key_id="field-key", secret_access_key="field-secret")
    everything = {**env_keys, **files, "AWS_PROFILE": "ci", "AWS_SESSION_TOKEN": "t"}
    assert keys(explicit, everything) == ("field-key", "field-secret", None)
    # A profile named on the component wins over keys in the environment (as in botocore);
    # AWS_PROFILE does not.
    assert keys(config(profile="ci"), everything) == ("ci-key", "ci-secret", "ci-token")
    assert keys(config(), everything) == ("env-key", "env-secret", "t")
    # Half a pair in the environment is no pair: the profile file is next.
    half = {"AWS_ACCESS_KEY_ID": "env-key", **files}
    assert keys(config(), half) == ("default-key", "default-secret", None)
    assert keys(config(), {**files, "AWS_PROFILE": "ci"}) == ("ci-key", "ci-secret", "ci-token")
    ci = ("ci-key", "ci-secret", "ci-token")
    assert keys(config(profile="ci"), {**files, "AWS_PROFILE": "other"}) == ci
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    write_credentials(home / ".aws" / "credentials")
    assert keys(config(profile="ci"), {"HOME": str(home)}) == ci
    # Nothing found: obstore's own chain (instance metadata, web identity) takes over.
    assert keys(config(), {"HOME": str(tmp_path / "nobody")}) is None
    for named, environ in (("broken", files), ("absent", files), ("ci", {"HOME": str(tmp_path)})):
        with pytest.raises(StoreUnavailable, match=f"profile '{named}'"):
            resolve_credentials(config(profile=named), environ)


def test_keys_never_show_in_the_location_or_repr(s3_bucket: S3Bucket) -> None:
    store = make_store(
        s3_bucket.endpoint,
        s3_bucket.bucket,
        access_key_id="AKIAVISIBLEKEY",
        secret_access_key="very-secret-value",
    )
    found = resolve_credentials(store.config, {})
    shown = f"{store.location} {found!r} {store.config!r}"
    assert "very-secret-value" not in shown and "AKIAVISIBLEKEY" not in shown


async def test_api_and_dashboard_downloads_stream_from_an_s3_store(
    home: Path, s3_bucket: S3Bucket
) -> None:
    """The default stack with its artifact store swapped for s3: outputs land in the bucket,
    and both download routes send the verified bytes of an object."""
    async with await Services.open(home) as services:
        await services.stacks.register_component(
            ComponentType.ARTIFACT_STORE, "objects", "s3", s3_bucket.config(prefix="api")
        )
        await services.stacks.register_stack(
            "cloud",
            {ComponentType.ORCHESTRATOR: "default", ComponentType.ARTIFACT_STORE: "objects"},
            activate=True,
        )
    async with serving(home) as (_, api):
        run = await submit(api)
        assert (await wait_status(api, run["id"]))["status"] == "completed"
        artifacts = (await api.get(f"/api/artifacts?run_id={run['id']}")).json()["items"]
        weights = next(a for a in artifacts if a["step_name"] == "train")
        assert weights["ref"]["uri"].startswith(f"s3://{s3_bucket.bucket}/api/")
        for path in (
            f"/api/artifacts/{weights['id']}/download",
            f"/artifacts/{weights['id']}/download",
        ):
            response = await api.get(path)
            assert response.status_code == 200, response.text
            body = response.content
            assert len(body) == weights["ref"]["size"]
            assert "blake3:" + blake3.blake3(body).hexdigest() == weights["ref"]["digest"]
        # A damaged object is refused, not sent.
        key = weights["ref"]["uri"].removeprefix(f"s3://{s3_bucket.bucket}/")
        s3_bucket.client().put_object(Bucket=s3_bucket.bucket, Key=key, Body=b"garbage")
        damaged = await api.get(f"/api/artifacts/{weights['id']}/download")
        assert damaged.status_code == 500 and "corrupted" in damaged.text
    assert not (home / "artifacts").exists()


def test_a_transfer_dropped_midway_is_done_again_and_refusals_are_not(
    store: S3ArtifactStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_put, real_get = obstore.put, obstore.get
    calls = {"put": 0, "get": 0}

    def flaky_put(*args: Any, **kwargs: Any) -> Any:
        calls["put"] += 1
        if calls["put"] == 1:
            raise GenericError("Generic S3 error: error sending request")
        return real_put(*args, **kwargs)

    def flaky_get(*args: Any, **kwargs: Any) -> Any:
        calls["get"] += 1
        if calls["get"] == 1:
            raise GenericError("Generic S3 error: error sending request")
        return real_get(*args, **kwargs)

    monkeypatch.setattr(obstore, "put", flaky_put)
    monkeypatch.setattr(obstore, "get", flaky_get)
    ref = store.put_bytes(b"worth keeping")
    assert store.get(ref.uri, ref.digest, lambda p: Path(p).read_bytes()) == b"worth keeping"
    assert calls == {"put": 2, "get": 2}

    def refused(*args: Any, **kwargs: Any) -> Any:
        calls["put"] += 1
        raise PermissionDeniedError("Forbidden (status code: 403) <Code>AccessDenied</Code>")

    monkeypatch.setattr(obstore, "put", refused)
    with pytest.raises(StoreUnavailable, match="denied"):
        store.put_bytes(b"not allowed")
    assert calls["put"] == 3  # tried once: a refusal does not pass by trying again


def test_a_damaged_object_is_written_again_by_the_next_put_of_its_bytes(
    store: S3ArtifactStore, s3_bucket: S3Bucket
) -> None:
    # As when a step runs again because its cached output was found corrupted.
    original = b"the original bytes"
    ref = store.put_bytes(original)
    key = ref.uri.removeprefix(f"s3://{s3_bucket.bucket}/")
    s3_bucket.client().put_object(Bucket=s3_bucket.bucket, Key=key, Body=b"the altered bytes!")
    assert store.put_bytes(original) == ref
    assert store.get_bytes(ref.uri, ref.digest) == original
