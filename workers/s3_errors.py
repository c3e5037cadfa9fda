"""What an obstore error means for a user of the ``s3`` store: what to check, and whether
trying again may help."""

from __future__ import annotations

import re
from dataclasses import dataclass

from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

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


def summary(exc: Exception) -> str:
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
