"""The ``s3`` flavor's configuration: what it accepts, how it normalizes, what it hides."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.contracts import ComponentSpec, ComponentType, ValidationError
from conveyor.workers.artifact_store_s3 import S3ArtifactStore
from conveyor.workers.flavors import ARTIFACT_STORES, flavors_of, get_flavor, masked_config
from conveyor.workers.s3_config import S3ArtifactStoreConfig, resolve_region

FLAVOR = get_flavor(ComponentType.ARTIFACT_STORE, "s3")


def validate(**config: Any) -> S3ArtifactStoreConfig:
    validated = FLAVOR.validate({"bucket": "my-bucket", **config})
    assert isinstance(validated, S3ArtifactStoreConfig)
    return validated


@pytest.mark.parametrize(
    "name",
    ["ab", "a" * 64, "My-Bucket", "my_bucket", "-bucket", "bucket-", ".bucket", "a..b",
     "a.-b", "192.168.1.10", "xn--bucket", "sthree-bucket", "bucket-s3alias", "bucket--ol-s3",
     "bucket/key", "s3://bucket", ""],
)  # fmt: skip
def test_bad_bucket_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="'bucket'"):
        FLAVOR.validate({"bucket": name})


@pytest.mark.parametrize("name", ["abc", "a" * 63, "my.bucket-2", "0-data", "192.168.1.bucket"])
def test_good_bucket_names_are_kept(name: str) -> None:
    assert FLAVOR.validate({"bucket": name}).model_dump()["bucket"] == name


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [("", ""), ("/", ""), ("runs", "runs"), ("/runs/prod/", "runs/prod"), ("a//b", "a/b"),
     ("team.a/v1", "team.a/v1"), ("x..y", "x..y")],
)  # fmt: skip
def test_prefixes_are_normalized(prefix: str, normal: str) -> None:
    assert validate(prefix=prefix).prefix == normal


@pytest.mark.parametrize("prefix", ["..", "a/../b", "./a", "a/.", "with space", "a\\b", "é"])
def test_prefixes_that_could_climb_or_confuse_are_refused(prefix: str) -> None:
    with pytest.raises(ValidationError, match="'prefix'"):
        validate(prefix=prefix)


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "x", "127.0.0.1:9000", "http://", "s3://bucket", "http://user:pw@minio:9000",
     "http://minio:9000?x=1", "http://minio:9000#f", "http://minio:99999"],
)  # fmt: skip
def test_endpoints_other_than_plain_http_urls_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="'endpoint_url'") as caught:
        validate(endpoint_url=url)
    assert "pw@" not in str(caught.value)


def test_endpoints_keep_http_for_local_servers_and_lose_the_trailing_slash() -> None:
    assert validate(endpoint_url="http://127.0.0.1:9000/").endpoint_url == "http://127.0.0.1:9000"
    assert validate(endpoint_url="https://s3.example.com").endpoint_url == "https://s3.example.com"


def test_unknown_keys_and_half_key_pairs_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown key 'endpoint'"):
        validate(endpoint="http://x")
    with pytest.raises(ValidationError, match="both access_key_id and secret_access_key"):
        validate(access_key_id="AKIA")
    with pytest.raises(ValidationError, match="both access_key_id and secret_access_key"):
        validate(secret_access_key="s")
    with pytest.raises(ValidationError, match="session_token needs"):
        validate(session_token="t")
    with pytest.raises(ValidationError, match="'region'"):
        validate(region="  ")


def test_every_key_is_described_and_the_keys_are_secrets() -> None:
    keys = {key.key: key for key in FLAVOR.config_keys()}
    assert all(key.description for key in keys.values())
    assert {k for k, key in keys.items() if key.secret} == {
        "access_key_id",
        "secret_access_key",
        "session_token",
    }
    assert keys["bucket"].required and not keys["prefix"].required


def test_secrets_are_masked_when_shown_and_kept_when_stored() -> None:
    config = {
        "bucket": "my-bucket",
        "endpoint_url": "http://minio:9000",
        "access_key_id": "AKIAEXAMPLE",
        "secret_access_key": "hush-hush",
        "session_token": "FwoGZXIvYXdzEXAMPLE",
    }
    component = ComponentSpec(
        id="c1", type=ComponentType.ARTIFACT_STORE, name="objects", flavor="s3", config=config
    )
    shown = masked_config(component)
    assert shown["bucket"] == "my-bucket" and shown["endpoint_url"] == "http://minio:9000"
    for key in ("access_key_id", "secret_access_key", "session_token"):
        assert shown[key] != config[key] and config[key] not in str(shown)
    assert FLAVOR.normalize(config) == config
    with pytest.raises(ValidationError) as caught:
        FLAVOR.validate({**config, "secret_access_key": 12})
    assert "hush-hush" not in str(caught.value)


def test_the_flavor_is_registered_and_builds_the_store() -> None:
    assert "s3" in {flavor.name for flavor in flavors_of(ComponentType.ARTIFACT_STORE)}
    store = ARTIFACT_STORES["s3"](validate(prefix="p", endpoint_url="http://127.0.0.1:1"))
    assert isinstance(store, S3ArtifactStore)
    assert store.location == "bucket 'my-bucket' (prefix 'p') at http://127.0.0.1:1"


def test_region_comes_from_the_field_then_the_environment_then_us_east_1() -> None:
    assert resolve_region(validate(region="eu-west-3"), {"AWS_REGION": "x"}) == "eu-west-3"
    assert resolve_region(validate(), {"AWS_REGION": "a", "AWS_DEFAULT_REGION": "b"}) == "a"
    assert resolve_region(validate(), {"AWS_DEFAULT_REGION": "b"}) == "b"
    assert resolve_region(validate(), {}) == "us-east-1"
    store = S3ArtifactStore(
        validate(), environ={"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    )
    assert store.location == "bucket 'my-bucket' at AWS S3 (us-east-1)"
