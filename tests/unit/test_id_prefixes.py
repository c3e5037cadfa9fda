"""Which record a typed id names: the exact id, or a prefix of exactly one, never a guess."""

from __future__ import annotations

import pytest

from conveyor.contracts import AmbiguousId, NotFoundError, ValidationError
from conveyor.service.store.id_prefixes import SHOWN_CANDIDATES, Candidate, pick_id


def found(*ids: str) -> list[Candidate]:
    return [Candidate(i, f"label of {i}") for i in ids]


def test_a_prefix_of_exactly_one_id_names_it() -> None:
    assert pick_id("run", "ab", found("abcdef")) == "abcdef"


def test_an_exact_id_wins_over_the_longer_ids_it_starts() -> None:
    assert pick_id("run", "abc", found("abcdef", "abc", "abcxyz")) == "abc"


def test_an_ambiguous_prefix_is_refused_with_the_candidates() -> None:
    with pytest.raises(AmbiguousId) as refused:
        pick_id("run", "ab", found("abc1", "abd2"))
    message = str(refused.value)
    assert "'ab' is the start of more than one run id" in message
    assert "abc1 (label of abc1)" in message and "abd2 (label of abd2)" in message
    assert refused.value.candidates == ["abc1", "abd2"]
    assert isinstance(refused.value, ValidationError)


def test_many_candidates_are_cut_and_say_so() -> None:
    ids = [f"a{i:02d}" for i in range(SHOWN_CANDIDATES + 1)]
    with pytest.raises(AmbiguousId) as refused:
        pick_id("artifact", "a", found(*ids))
    assert refused.value.candidates == ids[:SHOWN_CANDIDATES]
    assert str(refused.value).endswith("and more; give more characters")


@pytest.mark.parametrize("typed", ["", " ", "\t\n"])
def test_an_empty_id_is_refused_even_when_one_record_exists(typed: str) -> None:
    with pytest.raises(ValidationError, match="the run id is empty"):
        pick_id("run", typed, found("abc"))


def test_nothing_found_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="no artifact with id '%'"):
        pick_id("artifact", "%", [])
