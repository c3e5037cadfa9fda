"""The ``s3`` artifact store flavor: a bucket of any S3-compatible store, addressed by content.

Objects are keyed ``PREFIX/ab/<hex>`` by the blake3 digest of their bytes. Bytes move
between local temporary files and the store in parts, so an object never has to fit in
memory. obstore (Rust, object_store) does the HTTP: it streams files, signs requests, and
retries transient failures with exponential backoff and jitter.
"""

from __future__ import annotations

import configparser
import contextlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from conveyor.contracts import ArtifactUnreadable, BlobRef, ConveyorError, StoreUnavailable
from conveyor.workers import digests

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Credential

T = TypeVar("T")

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


# --- the store ----------------------------------------------------------------------

# Transient failures (connection errors, 5xx, timeouts of reads) are retried by obstore
# with exponential backoff and jitter: 0.1 s doubling up to 2 s, at most 3 retries within
# 20 s. A refused connection thus fails in well under a second and a black-holed endpoint
# in about 9 s (2 s connect timeout per try); longer outages are the worker's to retry,
# since StoreUnavailable for them is retryable.
_RETRY: RetryConfig = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=20),
    "backoff": {
        "init_backoff": timedelta(milliseconds=100),
        "max_backoff": timedelta(seconds=2),
        "base": 2,
    },
}
# obstore's default 30 s `timeout` covers a whole response body and would cut off a large
# download; a per-read timeout detects a stalled transfer instead.
_CLIENT: ClientConfig = {
    "connect_timeout": timedelta(seconds=2),
    "read_timeout": timedelta(seconds=20),
    "timeout": timedelta(hours=1),
}

_PART = 8 << 20
"""Bytes per multipart part and per chunk read back (few requests, modest memory); also the
largest object sent in one conditional request, which obstore holds in memory."""
_MAX_PARTS = 9_000
"""S3 allows 10,000 parts per upload; the part size grows past this for huge objects."""
_CONCURRENCY = 8
"""Parts in flight at once; memory held by an upload is about this many parts."""
_CONTENT_NAME = re.compile(r"/([0-9a-f]{2})/(\1[0-9a-f]{62})")


class S3ArtifactStore:
    """Artifacts as objects ``s3://BUCKET/PREFIX/ab/abcdef...`` named by their digest.

    An object is never overwritten with other bytes: small objects are created with
    ``If-None-Match: *``, large ones are uploaded in parts only when no object of that
    size is there yet (a concurrent writer of the same key writes the same bytes).
    """

    def __init__(
        self, config: S3ArtifactStoreConfig, environ: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self.config = config
        self.bucket = config.bucket
        self.prefix = config.prefix
        region = resolve_region(config, env)
        self.endpoint = config.endpoint_url or f"AWS S3 ({region})"
        self._root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._keys = f"{self.prefix}/" if self.prefix else ""
        credentials = resolve_credentials(config, env)
        self.credential_source = (
            credentials.source if credentials else "obstore's chain (instance or web identity)"
        )
        self._s3 = self._client(region, credentials)

    def _client(self, region: str, credentials: AwsCredentials | None) -> S3Store:
        endpoint = self.config.endpoint_url
        # Plain http only when the user named an http endpoint (MinIO, a test server).
        client: ClientConfig = {**_CLIENT, "allow_http": bool(endpoint and endpoint[:5] == "http:")}
        provider = None if credentials is None else _static_provider(credentials)
        try:
            if endpoint:
                return S3Store(
                    self.bucket,
                    region=region,
                    endpoint=endpoint,
                    client_options=client,
                    retry_config=_RETRY,
                    credential_provider=provider,
                )
            return S3Store(
                self.bucket,
                region=region,
                client_options=client,
                retry_config=_RETRY,
                credential_provider=provider,
            )
        except (BaseError, ValueError) as exc:
            raise StoreUnavailable(
                f"cannot set up the s3 artifact store {self.location}: {_summary(exc)}"
            ) from None

    @property
    def location(self) -> str:
        where = f"bucket {self.bucket!r}"
        if self.prefix:
            where += f" (prefix {self.prefix!r})"
        return f"{where} at {self.endpoint}"

    def key_of(self, digest: str) -> str:
        hexdigest = digest.partition(":")[2]
        return f"{self._keys}{hexdigest[:2]}/{hexdigest}"

    def _ref(self, digest: str, size: int) -> BlobRef:
        return BlobRef(uri=f"s3://{self.bucket}/{self.key_of(digest)}", digest=digest, size=size)

    def put(self, write: Callable[[str], None]) -> BlobRef:
        with _scratch_file() as path:
            write(path)
            digest, size = digests.of_file(path)
            self._upload(Path(path), digest, size)
        return self._ref(digest, size)

    def put_bytes(self, data: bytes) -> BlobRef:
        digest = digests.of_bytes(data)
        self._upload(data, digest, len(data))
        return self._ref(digest, len(data))

    def _upload(self, source: Path | bytes, digest: str, size: int) -> None:
        key = self.key_of(digest)
        try:
            if size <= _PART:
                self._create(key, source)
            elif not self._holds(key, size):
                # obstore sends a conditional put whole, from memory; a large object goes
                # in parts instead, read from the file as they are sent.
                obstore.put(
                    self._s3,
                    key,
                    source,
                    use_multipart=True,
                    chunk_size=max(_PART, -(-size // _MAX_PARTS)),
                    max_concurrency=_CONCURRENCY,
                )
        except (BaseError, FileNotFoundError) as exc:
            raise self._error(exc, f"cannot store an object in {self.location}") from None

    def _create(self, key: str, source: Path | bytes) -> None:
        # A content address holds the same bytes whoever wrote them: an existing object
        # means the work is done.
        with contextlib.suppress(AlreadyExistsError):
            obstore.put(self._s3, key, source, mode="create", use_multipart=False)

    def _holds(self, key: str, size: int) -> bool:
        try:
            return obstore.head(self._s3, key)["size"] == size
        except FileNotFoundError:
            return False

    def key_of_uri(self, uri: str) -> str:
        """The key behind ``uri``; refuses anything but the shape this store writes."""
        if uri.startswith(self._root) and _CONTENT_NAME.fullmatch(uri, len(self._root)):
            return self._keys + uri[len(self._root) + 1 :]
        raise ArtifactUnreadable(
            f"{uri!r} is not an object of the s3 artifact store {self.location} "
            f"(expected {self._root}/ab/<64 hex digits>)"
        )

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        key = self.key_of_uri(uri)
        algorithm, expected = digests.split(digest)
        with _scratch_file() as path:
            actual = self._download(key, uri, path, algorithm)
            if actual != expected:
                raise ArtifactUnreadable(
                    f"artifact {uri} is corrupted: its {algorithm} is {actual[:12]}..., "
                    f"expected {expected[:12]}..."
                )
            # Unlinked when read returns; a handle read opened stays readable on POSIX.
            return read(path)

    def _download(self, key: str, uri: str, path: str, algorithm: str) -> str:
        """Stream the object at ``key`` into ``path``; the hex digest of its bytes."""
        hasher = digests.new_hasher(algorithm)
        with open(path, "wb") as out:
            try:
                for chunk in obstore.get(self._s3, key).stream(min_chunk_size=_PART):
                    hasher.update(chunk)
                    out.write(chunk)
            except (BaseError, FileNotFoundError) as exc:
                raise self._error(exc, f"cannot read {uri} from {self.location}", uri=uri) from None
        return hasher.hexdigest()

    def check(self) -> None:
        # Listing a folder that does not exist is one cheap request, and it fails on a
        # missing bucket, which a HEAD of a missing key cannot tell from a missing key.
        try:
            obstore.list_with_delimiter(self._s3, f"{self._keys}.conveyor-check")
        except (BaseError, FileNotFoundError) as exc:
            raise self._error(exc, f"cannot use the s3 artifact store {self.location}") from None

    def _error(self, exc: Exception, doing: str, *, uri: str | None = None) -> ConveyorError:
        failure = classify(exc)
        if failure is NO_OBJECT and uri is not None:
            return ArtifactUnreadable(f"artifact {uri} is missing from {self.location}")
        detail = _summary(exc)
        if failure in (REFUSED, DENIED):
            detail += f"; keys from {self.credential_source}"
        return StoreUnavailable(
            f"{doing}: {failure.advice} ({detail})", retryable=failure.retryable
        )


def make_s3_store(config: BaseModel) -> S3ArtifactStore:
    """The factory the flavor table calls with a validated config."""
    return S3ArtifactStore(S3ArtifactStoreConfig.model_validate(config))


def _static_provider(credentials: AwsCredentials) -> Callable[[], S3Credential]:
    # A provider, not keys in the config: obstore would otherwise mix in an
    # AWS_SESSION_TOKEN from the environment that belongs to other keys.
    def provide() -> S3Credential:
        return {
            "access_key_id": credentials.access_key_id,
            "secret_access_key": credentials.secret_access_key,
            "token": credentials.session_token,
            "expires_at": None,
        }

    return provide


@contextlib.contextmanager
def _scratch_file() -> Iterator[str]:
    """A fresh empty local file, deleted on exit whatever happens."""
    handle, path = tempfile.mkstemp(prefix="conveyor-s3-")
    os.close(handle)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- what went wrong ----------------------------------------------------------------

_S3_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_S3_MESSAGE = re.compile(r"<Message>([^<]{1,300})</Message>")
_STATUS = re.compile(r"status code: (\d{3})")
_REFUSED_KEYS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_REGION_CODES = frozenset({"AuthorizationHeaderMalformed", "PermanentRedirect"})
_CONNECTION_MARKERS = ("error sending request", "dns error", "connection refused", "timed out")


@dataclass(frozen=True)
class Failure:
    """What an obstore error means for the user: what to check, and whether to retry."""

    advice: str
    retryable: bool


NO_BUCKET = Failure(
    "the bucket does not exist: create it, or fix 'bucket' and 'endpoint_url'", False
)
REFUSED = Failure(
    "the access key was refused: check access_key_id and secret_access_key, or the AWS "
    "credentials of the environment or profile",
    False,
)
DENIED = Failure(
    "access was denied: check the keys, and that they may list the bucket and get and put "
    "its objects",
    False,
)
WRONG_REGION = Failure("the bucket is in another region: set 'region'", False)
NO_OBJECT = Failure("the object is missing", False)
UNREACHABLE = Failure(
    "the endpoint does not answer: check 'endpoint_url', that the server runs, and the network",
    True,
)
NOT_S3 = Failure(
    "the endpoint answered without an S3 error: check that 'endpoint_url' is an S3 API", False
)
OTHER = Failure("the store failed; retrying may help", True)


def classify(exc: Exception) -> Failure:
    """The meaning of an obstore error, by its S3 error code, HTTP status and class."""
    text = str(exc)
    code = _S3_CODE.search(text)
    status = _STATUS.search(text)
    name = code[1] if code else ""
    if name == "NoSuchBucket":
        return NO_BUCKET
    if name in _REFUSED_KEYS or isinstance(exc, UnauthenticatedError):
        return REFUSED
    if name in _REGION_CODES or (status and status[1] == "301"):
        return WRONG_REGION
    if isinstance(exc, PermissionDeniedError) or (status and status[1] == "403"):
        return DENIED
    if isinstance(exc, FileNotFoundError):
        return NO_OBJECT
    if not status and any(marker in text.lower() for marker in _CONNECTION_MARKERS):
        return UNREACHABLE
    if status and status[1] == "404" and not code:
        return NOT_S3
    return OTHER


def _summary(exc: Exception) -> str:
    """A one-line reason: the S3 error code and message, else obstore's first line."""
    text = str(exc)
    code, message = _S3_CODE.search(text), _S3_MESSAGE.search(text)
    if code:
        return f"{code[1]}: {message[1]}" if message else code[1]
    status = _STATUS.search(text)
    if status:
        return f"HTTP {status[1]}"
    # obstore's first line ends with the cause after the request it was doing.
    cause = text.split("\n", 1)[0].rpartition(" - ")[2].strip()
    return cause[:300] or type(exc).__name__
