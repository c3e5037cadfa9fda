"""The ``s3`` artifact store flavor: a bucket of any S3-compatible store, addressed by content.

Objects are keyed ``PREFIX/ab/<hex>`` by the blake3 digest of their bytes. Bytes move
between local temporary files and the store in parts, so an object never has to fit in
memory. obstore (Rust, object_store) does the HTTP: it streams files, signs requests, and
retries transient failures with exponential backoff and jitter.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
)
from obstore.store import S3Store
from pydantic import BaseModel

from conveyor.contracts import ArtifactUnreadable, BlobRef, ConveyorError, StoreUnavailable
from conveyor.workers import digests
from conveyor.workers.loggers import get_logger
from conveyor.workers.s3_config import (
    AwsCredentials,
    S3ArtifactStoreConfig,
    resolve_credentials,
    resolve_region,
)
from conveyor.workers.s3_errors import DENIED, NO_OBJECT, REFUSED, classify, summary

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Credential

log = get_logger("conveyor.s3")
T = TypeVar("T")

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
# download; a per-read timeout detects a stalled transfer instead. It is long, because a
# store answers the request that completes a multipart upload only once it has assembled the
# object (AWS says this can take minutes; a test server took over 20 s for 1 GB).
_TRANSFERS: ClientConfig = {
    "connect_timeout": timedelta(seconds=2),
    "read_timeout": timedelta(minutes=5),
    "timeout": timedelta(hours=1),
}
# Checks and HEADs answer at once from a working store: a hung one is told in seconds.
_PROBES: ClientConfig = {
    "connect_timeout": timedelta(seconds=2),
    "read_timeout": timedelta(seconds=10),
    "timeout": timedelta(seconds=30),
}

_PART = 8 << 20
"""Bytes per multipart part and per chunk read back (few requests, modest memory); also the
largest object sent in one conditional request, which obstore holds in memory."""
_MAX_PARTS = 9_000
"""S3 allows 10,000 parts per upload; the part size grows past this for huge objects."""
_CONCURRENCY = 8
"""Parts in flight at once; memory held by an upload is about this many parts."""
_ATTEMPTS = 3
"""Whole transfers tried at most this often when they fail in a way that may pass."""
_BACKOFF_S = 0.5
_CONTENT_NAME = re.compile(r"/([0-9a-f]{2})/(\1[0-9a-f]{62})")


class S3ArtifactStore:
    """Artifacts as objects ``s3://BUCKET/PREFIX/ab/abcdef...`` named by their digest.

    An object is never overwritten with other bytes: small objects are created with
    ``If-None-Match: *``, large ones are uploaded in parts only when no object of that
    size is there yet (a concurrent writer of the same key writes the same bytes). A small
    object found damaged at its address is written again: a step run again because its
    cached output was found corrupted must leave a readable one.
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
        self._s3 = self._client(region, credentials, _TRANSFERS)
        self._probe = self._client(region, credentials, _PROBES)

    def _client(
        self, region: str, credentials: AwsCredentials | None, options: ClientConfig
    ) -> S3Store:
        endpoint = self.config.endpoint_url
        # Plain http only when the user named an http endpoint (MinIO, a test server).
        client: ClientConfig = {**options, "allow_http": bool(endpoint and endpoint[:5] == "http:")}
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
                f"cannot set up the s3 artifact store {self.location}: {summary(exc)}"
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

    def put(self, write: Callable[[str], str | None]) -> BlobRef:
        with _scratch_file() as path:
            digest = write(path)
            if digest is None:
                digest, size = digests.of_file(path)
            else:
                size = os.stat(path).st_size
            self._upload(Path(path), digest, size)
        return self._ref(digest, size)

    def put_bytes(self, data: bytes) -> BlobRef:
        digest = digests.of_bytes(data)
        self._upload(data, digest, len(data))
        return self._ref(digest, len(data))

    def _upload(self, source: Path | bytes, digest: str, size: int) -> None:
        key = self.key_of(digest)

        def upload() -> None:
            if size <= _PART:
                self._create(key, source, digest)
            elif not self._holds(key, size):
                # obstore sends a conditional put whole, from memory; a large object goes
                # in parts instead, read from the file as they are sent.
                try:
                    obstore.put(
                        self._s3,
                        key,
                        source,
                        use_multipart=True,
                        chunk_size=max(_PART, -(-size // _MAX_PARTS)),
                        max_concurrency=_CONCURRENCY,
                    )
                except FileNotFoundError:
                    # Its clean-up found no upload to abort: the store completed it after
                    # all, though the answer did not arrive.
                    if not self._holds(key, size):
                        raise

        self._again_if_transient(upload, f"cannot store an object in {self.location}")

    def _again_if_transient(
        self, operation: Callable[[], T], doing: str, *, uri: str | None = None
    ) -> T:
        """``operation()``, done again from the start when it fails in a way that may pass
        (a dropped connection in the middle of a large transfer, which obstore's own
        retries of single requests do not cover), with backoff and jitter."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return operation()
            except (BaseError, FileNotFoundError) as exc:
                error = self._error(exc, doing, uri=uri)
                if not error.retryable or attempt == _ATTEMPTS:
                    raise error from None
                log.warning("s3 transfer failed; trying again", attempt=attempt, error=str(error))
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _create(self, key: str, source: Path | bytes, digest: str) -> None:
        # A content address holds the same bytes whoever wrote them: an existing intact
        # object means the work is done.
        try:
            obstore.put(self._s3, key, source, mode="create", use_multipart=False)
        except AlreadyExistsError:
            if not self._intact(key, digest):
                obstore.put(self._s3, key, source, mode="overwrite", use_multipart=False)

    def _holds(self, key: str, size: int) -> bool:
        # By size only: reading a large object back to check its bytes would cost as much
        # as writing it again (a large object damaged in place, keeping its size, fails
        # its digest check when read, with an error that names it).
        try:
            return obstore.head(self._probe, key)["size"] == size
        except FileNotFoundError:
            return False

    def _intact(self, key: str, digest: str) -> bool:
        algorithm, expected = digests.split(digest)
        hasher = digests.new_hasher(algorithm)
        try:
            for chunk in obstore.get(self._s3, key).stream(min_chunk_size=_PART):
                hasher.update(chunk)
        except FileNotFoundError:
            return False
        return hasher.hexdigest() == expected

    def key_of_uri(self, uri: str) -> str:
        """The key behind ``uri``; refuses anything but the shape this store writes."""
        if uri.startswith(self._root) and _CONTENT_NAME.fullmatch(uri, len(self._root)):
            return self._keys + uri[len(self._root) + 1 :]
        raise ArtifactUnreadable(
            f"{uri!r} is not an object of the s3 artifact store {self.location} "
            f"(expected {self._root}/ab/<64 hex digits>)"
        )

    def get_bytes(self, uri: str, digest: str) -> bytes:
        key = self.key_of_uri(uri)
        data = self._again_if_transient(
            lambda: bytes(obstore.get(self._s3, key).bytes()),
            f"cannot read {uri} from {self.location}",
            uri=uri,
        )
        digests.verify_bytes(data, digest, uri)
        return data

    def get(self, uri: str, digest: str, read: Callable[[str], T]) -> T:
        key = self.key_of_uri(uri)
        algorithm = digests.split(digest)[0]
        with _scratch_file() as path:
            actual = self._again_if_transient(
                lambda: self._download(key, path, algorithm),
                f"cannot read {uri} from {self.location}",
                uri=uri,
            )
            digests.require(uri, digest, actual)
            # Unlinked when read returns; a handle read opened stays readable on POSIX.
            return read(path)

    def _download(self, key: str, path: str, algorithm: str) -> str:
        """Stream the object at ``key`` into ``path`` (from its start); the hex digest."""
        hasher = digests.new_hasher(algorithm)
        with open(path, "wb") as out:
            for chunk in obstore.get(self._s3, key).stream(min_chunk_size=_PART):
                hasher.update(chunk)
                out.write(chunk)
        return hasher.hexdigest()

    def check(self) -> None:
        # Listing a folder that does not exist is one cheap request, and it fails on a
        # missing bucket, which a HEAD of a missing key cannot tell from a missing key.
        try:
            obstore.list_with_delimiter(self._probe, f"{self._keys}.conveyor-check")
        except (BaseError, FileNotFoundError) as exc:
            raise self._error(exc, f"cannot use the s3 artifact store {self.location}") from None

    def _error(self, exc: Exception, doing: str, *, uri: str | None = None) -> ConveyorError:
        failure = classify(exc)
        if failure is NO_OBJECT and uri is not None:
            return ArtifactUnreadable(f"artifact {uri} is missing from {self.location}")
        detail = summary(exc)
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
