"""Which run requests make the controller wait for a withdrawal that may follow them."""

from __future__ import annotations

from datetime import timedelta

from conveyor.contracts import RunRequested, new_id, utcnow
from conveyor.service.controller import QUEUED_REQUEST_S, waited_for_a_controller


def request_sent(seconds_ago: float) -> RunRequested:
    return RunRequested(
        run_id=new_id(), pipeline="p", time=utcnow() - timedelta(seconds=seconds_ago)
    )


def test_a_request_taken_at_once_is_not_waited_on_and_one_that_sat_in_the_queue_is() -> None:
    now = utcnow()
    assert not waited_for_a_controller(request_sent(0.01), now)
    assert waited_for_a_controller(request_sent(QUEUED_REQUEST_S + 5), now)
    # A client whose clock runs ahead: taken for fresh (the earlier behaviour).
    assert not waited_for_a_controller(request_sent(-30), now)
