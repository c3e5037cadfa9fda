"""Hiding secrets in component configurations before anything shows or exports them.

A secret is a value of a ``SecretStr`` field, a value under a key that names a secret
(``password``, ``token``...) whatever its declared type, or the password inside a URL
(``amqp://guest:guest@host/``). A secret URL is shown as ``amqp://guest:****@host/`` (no
query string, which may carry a token), so a user can still tell which host it points to.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretBytes, SecretStr

# Pydantic's own rendering of a SecretStr, so a validated dump and our masking agree.
MASK = "**********"
URL_MASK = "****"

_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):(?P<pw>[^@/?#\s]*)@")
_SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "credential")


def _is_secret_type(annotation: Any) -> bool:
    if annotation in (SecretStr, SecretBytes):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_is_secret_type(arg) for arg in get_args(annotation))
    return False


def secret_keys(model: type[BaseModel]) -> set[str]:
    """Keys of ``model`` whose values are secrets: declared SecretStr or named like one."""
    return {
        key
        for key, field in model.model_fields.items()
        if _is_secret_type(field.annotation) or is_secret_name(key)
    }


def is_secret_name(key: str) -> bool:
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask_urls(value: Any) -> Any:
    """``value`` with the password of every URL in it (nested too) replaced by ****."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{URL_MASK}@", value)
    if isinstance(value, Mapping):
        return {k: mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_urls(v) for v in value]
    return value


def mask_secret(value: Any) -> Any:
    """A secret as shown: a URL with credentials keeps scheme, user, host and path; else MASK."""
    if isinstance(value, str):
        parts = urlsplit(value)
        if _URL_PASSWORD.match(value) and parts.hostname:
            user = parts.username or ""
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit((parts.scheme, f"{user}:{URL_MASK}@{host}", parts.path, "", ""))
    return MASK


def mask_value(key: str, value: Any, *, secret: bool = False) -> Any:
    """The value to show for ``key``: a secret masked, else with URL passwords hidden."""
    if value is None:
        return None
    if secret or is_secret_name(key):
        return mask_secret(value)
    return mask_urls(value)


def mask(
    config: Mapping[str, Any], secret: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``config`` with the values of ``secret`` keys (and of secret-named keys) hidden."""
    return {key: mask_value(key, value, secret=key in secret) for key, value in config.items()}


def masked_paths(value: Any, path: str = "") -> list[str]:
    """Where ``value`` still holds a masked secret (it was exported without secrets)."""
    if isinstance(value, str):
        masked = value == MASK or bool(
            (m := _URL_PASSWORD.match(value)) is not None and m["pw"] == URL_MASK
        )
        return [path] if masked else []
    if isinstance(value, Mapping):
        return [
            found
            for key, item in value.items()
            for found in masked_paths(item, f"{path}.{key}" if path else str(key))
        ]
    if isinstance(value, list | tuple):
        return [
            found for i, item in enumerate(value) for found in masked_paths(item, f"{path}[{i}]")
        ]
    return []


def reveal(value: Any) -> Any:
    """A python dump of a config with SecretStr values as plain strings (for storing)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, SecretBytes):
        return value.get_secret_value().decode()
    if isinstance(value, Mapping):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reveal(v) for v in value]
    return value
