"""Which record a person means by an id they typed: the exact id, or a prefix of exactly one.

Pure: the store fetches the ids that start with what was typed (without LIKE, so ``%`` and
``_`` are themselves) and :func:`pick_id` decides. Never the newest of several: a command
like ``conveyor run delete`` must not act on a record the person did not name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from conveyor.contracts import AmbiguousId, NotFoundError, ValidationError
from conveyor.contracts.errors import shown
from conveyor.contracts.models import MAX_ID_LENGTH

SHOWN_CANDIDATES = 10
"""How many of the records an ambiguous prefix matches the error lists."""


class Candidate(NamedTuple):
    """A record whose id starts with the typed text, and how to tell it from the others."""

    id: str
    label: str


def check_typed_id(kind: str, typed: str) -> None:
    """Refuse what cannot name one record: an empty (or blank) id matches every one."""
    if not typed.strip():
        raise ValidationError(f"the {kind} id is empty: give the id or its first characters")


def could_match(typed: str) -> bool:
    """Whether any stored id could start with ``typed`` (stored ids are bounded)."""
    return 0 < len(typed) <= MAX_ID_LENGTH


def pick_id(kind: str, typed: str, candidates: Sequence[Candidate]) -> str:
    """The id that ``typed`` names among ``candidates``, the ids that start with it.

    ``candidates`` may be cut after ``SHOWN_CANDIDATES + 1``: more than one is ambiguous
    anyway. An exact id wins over the longer ids it is a prefix of.
    """
    check_typed_id(kind, typed)
    ids = [c.id for c in candidates]
    if typed in ids:
        return typed
    if not candidates:
        raise NotFoundError(f"no {kind} with id {shown(typed)}")
    if len(candidates) == 1:
        return candidates[0].id
    listed = "; ".join(f"{c.id} ({c.label})" for c in candidates[:SHOWN_CANDIDATES])
    more = " and more" if len(candidates) > SHOWN_CANDIDATES else ""
    raise AmbiguousId(
        f"{shown(typed)} is the start of more than one {kind} id: {listed}{more}; "
        "give more characters",
        candidates=ids[:SHOWN_CANDIDATES],
    )
