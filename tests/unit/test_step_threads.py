"""Threads for sync step bodies: a stuck body never delays the next; idle threads are reused."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from conveyor.workers import step_threads
from conveyor.workers.step_threads import StepThreads


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_stuck_body_does_not_delay_the_next_one() -> None:
    threads, release, second = StepThreads(), threading.Event(), threading.Event()
    threads.run(lambda: release.wait(30))
    threads.run(second.set)
    try:
        assert second.wait(10), "the second job waited for the stuck one"
    finally:
        release.set()


def test_an_idle_thread_takes_the_next_job_and_ends_when_idle_too_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = StepThreads()
    ran_in: list[threading.Thread] = []
    threads.run(lambda: ran_in.append(threading.current_thread()))
    wait_for(lambda: threads._idle == 1, "the thread to be idle")
    monkeypatch.setattr(step_threads, "IDLE_S", 0.05)
    threads.run(lambda: ran_in.append(threading.current_thread()))
    wait_for(lambda: len(ran_in) == 2, "the second job to run")
    assert ran_in[0] is ran_in[1] and ran_in[0].daemon
    wait_for(lambda: not ran_in[0].is_alive(), "the idle thread to end")
    assert threads._idle == 0
