"""Two identical steps in flight compute once: the bookkeeping, called directly."""

from __future__ import annotations

from conveyor.service.in_flight import InFlight


def test_the_first_claim_computes_the_others_wait_and_are_handed_back() -> None:
    flight = InFlight()
    assert flight.claim("k", ("r1", "a"))
    assert flight.claim("k", ("r1", "a"))  # claiming again (a retry) is still the owner
    assert not flight.claim("k", ("r1", "b"))
    assert not flight.claim("k", ("r2", "a"))
    assert flight.claim("other", ("r2", "c"))
    assert flight.finish(("r1", "b")) is None  # a waiter computes nothing
    assert flight.finish(("r1", "a")) == ("k", [("r1", "b"), ("r2", "a")])
    assert flight.finish(("r1", "a")) is None  # finished once
    # Once the owner finished, the key is free: the next claim computes.
    assert flight.claim("k", ("r3", "a"))
    assert flight.finish(("r2", "c")) == ("other", [])
