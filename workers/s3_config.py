"""Configuration of the ``s3`` artifact store flavor, and where its credentials and region
come from: the component's secret keys, else the standard AWS chain."""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from conveyor.contracts import StoreUnavailable

DEFAULT_REGION = "us-east-1"

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()=+-]+")
_MAX_PREFIX = 512


class S3ArtifactStoreConfig(BaseModel):
    """Configuration of the ``s3`` artifact store flavor."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(description="Name of an existing bucket that holds the artifacts")
    prefix: str = Field(
        default="", description="Folder inside the bucket under which every object is kept"
    )
    endpoint_url: str | None = Field(
        default=None,
        description="URL of an S3-compatible endpoint (MinIO, R2, ...); unset means AWS S3",
    )
    region: str | None = Field(
        default=None,
        description="Region of the bucket; unset: AWS_REGION, AWS_DEFAULT_REGION, or us-east-1",
    )
    profile: str | None = Field(
        default=None,
        description="Profile of the shared AWS credentials file to take the keys from (wins over "
        "AWS_ACCESS_KEY_ID)",
    )
    access_key_id: SecretStr | None = Field(
        default=None, description="Access key id; unset: the standard AWS credential chain"
    )
    secret_access_key: SecretStr | None = Field(
        default=None, description="Secret access key that goes with access_key_id"
    )
    session_token: SecretStr | None = Field(
        default=None, description="Session token of temporary credentials"
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        problem = bucket_name_problem(value)
        if problem:
            raise ValueError(f"not a valid S3 bucket name: {problem}")
        return value

    @field_validator("prefix")
    @classmethod
    def _normal_prefix(cls, value: str) -> str:
        return normal_prefix(value)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else normal_endpoint(value)

    @field_validator("region", "profile")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank; leave it unset instead")
        return value

    @model_validator(mode="after")
    def _key_pair(self) -> S3ArtifactStoreConfig:
        # Half a key pair would silently fall back to other credentials: refuse it.
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        return self


def bucket_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as an S3 bucket name, or None."""
    if not 3 <= len(name) <= 63:
        return "3 to 63 characters"
    if not _BUCKET.fullmatch(name):
        return "lowercase letters, digits, dots and hyphens, from a letter or digit to one"
    if ".." in name or ".-" in name or "-." in name:
        return "no two adjacent dots, and no dot next to a hyphen"
    with contextlib.suppress(ValueError):
        ipaddress.IPv4Address(name)
        return "not formatted as an IP address"
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        return "a prefix or suffix reserved by AWS"
    return None


def normal_prefix(value: str) -> str:
    """``value`` without leading, trailing or doubled slashes; refuses ``.`` and ``..``."""
    segments = [s for s in value.split("/") if s]
    for segment in segments:
        if segment in (".", ".."):
            raise ValueError("'.' and '..' are not allowed in a prefix")
        if not _PREFIX_SEGMENT.fullmatch(segment):
            raise ValueError(f"{segment!r}: use letters, digits and !_.*'()=+- between slashes")
    prefix = "/".join(segments)
    if len(prefix) > _MAX_PREFIX:
        raise ValueError(f"at most {_MAX_PREFIX} characters")
    return prefix


def normal_endpoint(value: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment; no trailing slash."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host")
    if parts.username or parts.password:
        # The URL is shown in messages; keys belong in the secret fields.
        raise ValueError("must not carry credentials; use access_key_id and secret_access_key")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value.strip().rstrip("/")


# --- credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class AwsCredentials:
    """A key pair and where it came from (``source`` is safe to show; the keys are not)."""

    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(repr=False)
    source: str


def resolve_credentials(
    config: S3ArtifactStoreConfig, environ: Mapping[str, str]
) -> AwsCredentials | None:
    """The keys to sign with, in the order of the standard AWS chain.

    The component's own key fields, then its ``profile`` (named on the component, it wins
    over the environment, as in botocore), then ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``, then the ``AWS_PROFILE`` (or default) profile of the shared
    credentials file. None leaves the rest of the chain (instance metadata, web identity,
    containers) to obstore.
    """
    if config.access_key_id is not None and config.secret_access_key is not None:
        token = config.session_token.get_secret_value() if config.session_token else None
        return AwsCredentials(
            config.access_key_id.get_secret_value(),
            config.secret_access_key.get_secret_value(),
            token,
            "the component's access_key_id",
        )
    if config.profile:
        return _profile_credentials(config.profile, environ)
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        token = environ.get("AWS_SESSION_TOKEN") or None
        return AwsCredentials(key, secret, token, "AWS_ACCESS_KEY_ID")
    return _profile_credentials(environ.get("AWS_PROFILE"), environ)


def credentials_file(environ: Mapping[str, str]) -> Path:
    """The shared credentials file: ``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``."""
    named = environ.get("AWS_SHARED_CREDENTIALS_FILE")
    if named:
        return Path(named).expanduser()
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".aws" / "credentials"


def _profile_credentials(named: str | None, environ: Mapping[str, str]) -> AwsCredentials | None:
    path = credentials_file(environ)
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise StoreUnavailable(
            f"cannot parse the AWS credentials file {path}: {exc.message}"
        ) from None
    name = named or "default"
    section = parser[name] if parser.has_section(name) else {}
    key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
    if key and secret:
        token = section.get("aws_session_token") or None
        return AwsCredentials(key, secret, token, f"profile {name!r} of {path}")
    if named:
        # A profile asked for by name must not silently become other credentials.
        raise StoreUnavailable(
            f"AWS profile {name!r} has no aws_access_key_id and aws_secret_access_key in "
            f"{path}: add them, or set AWS_SHARED_CREDENTIALS_FILE to the right file"
        )
    return None


def resolve_region(config: S3ArtifactStoreConfig, environ: Mapping[str, str]) -> str:
    return (
        config.region
        or environ.get("AWS_REGION")
        or environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )
