"""A failed step's texts: the traceback starts at the user's code; both texts are bounded."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from conveyor.contracts import ConveyorError
from conveyor.contracts.events import MAX_STEP_ERROR_LENGTH, MAX_TRACEBACK_LENGTH
from conveyor.workers.materializers import choose
from conveyor.workers.step_failures import error_line, keep_head, keep_tail, user_traceback


def users_helper() -> None:
    raise ValueError("the user's own error")


CONVEYORS_SOURCE = """
def run(call):
    try:
        call()
    except BaseException as exc:
        return exc

def broken():
    return {}["missing"]

def store_object():
    choose(object(), allow_pickle=False, what="output 'x'")
"""
CONVEYORS: dict[str, Any] = {"__name__": "conveyor.workers.simulated", "choose": choose}
"""Functions whose frames are Conveyor's (by their module's name), as a worker's are."""
exec(CONVEYORS_SOURCE, CONVEYORS)


def _caught_by_conveyor(call: Callable[[], object]) -> BaseException:
    """What ``call`` raised, caught in a frame of Conveyor's, as a worker catches it."""
    exc = CONVEYORS["run"](call)
    assert isinstance(exc, BaseException)
    return exc


def test_keep_tail_keeps_the_end_within_the_limit() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    kept = keep_tail(text, 200)
    assert len(kept) == 200
    assert kept.startswith(f"[cut to its end: {len(text)} characters in all]\n")
    assert kept.endswith("line 999\n")
    assert keep_tail("short", 200) == "short"


def test_keep_head_keeps_the_start_within_the_limit() -> None:
    kept = keep_head("ValueError: " + "x" * 500, 100)
    assert len(kept) == 100
    assert kept.startswith("ValueError: xxx") and kept.endswith("[cut: 512 characters in all]")


def test_the_traceback_starts_at_the_first_frame_that_is_not_conveyors() -> None:
    exc = _caught_by_conveyor(users_helper)
    assert "conveyor.workers.simulated" in str(exc.__traceback__.tb_frame.f_globals["__name__"])
    text = user_traceback(exc)
    assert text is not None
    lines = text.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    line = users_helper.__code__.co_firstlineno + 1
    assert lines[1] == f'  File "{__file__}", line {line}, in users_helper'
    assert lines[-1] == "ValueError: the user's own error"
    assert "simulated" not in text and "<string>" not in text


def test_frames_of_the_import_machinery_before_the_users_are_cut_too() -> None:
    importing: dict[str, Any] = {"__name__": "importlib._bootstrap"}
    exec("def _call_with_frames_removed(f):\n    return f()\n", importing)
    exc = _caught_by_conveyor(partial(importing["_call_with_frames_removed"], users_helper))
    text = user_traceback(exc)
    assert text is not None
    assert text.splitlines()[1].startswith(f'  File "{__file__}"')
    assert "_call_with_frames_removed" not in text


def test_a_fault_in_conveyors_own_code_keeps_its_whole_traceback() -> None:
    text = user_traceback(_caught_by_conveyor(CONVEYORS["broken"]))
    assert text is not None
    assert 'File "<string>", line 4, in run' in text and "in broken" in text


def test_a_conveyor_error_without_user_frames_has_no_traceback() -> None:
    exc = _caught_by_conveyor(CONVEYORS["store_object"])
    assert isinstance(exc, ConveyorError) and "no materializer can store" in str(exc)
    assert user_traceback(exc) is None


def test_the_error_line_is_bounded_and_survives_a_failing_str() -> None:
    class Hostile(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_line(Hostile()) == "Hostile: <the error's message could not be made>"
    assert len(error_line(ValueError("x" * 100_000))) == MAX_STEP_ERROR_LENGTH
    huge = user_traceback(_caught_by_conveyor(lambda: exec("raise ValueError('y' * 100_000)")))
    assert huge is not None and len(huge) == MAX_TRACEBACK_LENGTH
