"""Synchronous calls where an event loop already runs in the thread (Jupyter, IPython)."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import pytest

from conveyor.service.blocking import run_to_end
from conveyor.service.client import Client
from conveyor.service.pipeline_parameters import ParameterError


def test_where_a_loop_runs_the_coroutine_gets_a_loop_of_its_own_and_its_result_comes_back() -> None:
    async def cell() -> tuple[bool, bool, int]:
        caller_thread, caller_loop = threading.current_thread(), asyncio.get_running_loop()

        async def main() -> tuple[bool, bool, int]:
            elsewhere = threading.current_thread() is not caller_thread
            return elsewhere, asyncio.get_running_loop() is not caller_loop, 42

        return run_to_end(main)

    assert asyncio.run(cell()) == (True, True, 42)


def test_an_exception_comes_back_as_it_was_raised() -> None:
    async def main() -> None:
        raise ParameterError("x: expected an integer")

    async def cell() -> None:
        run_to_end(main)

    with pytest.raises(ParameterError, match="x: expected an integer"):
        asyncio.run(cell())


def test_ctrl_c_cancels_the_coroutine_and_waits_for_it_to_wind_down() -> None:
    started = threading.Event()
    wound_down: list[str] = []

    async def main() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.1)  # a cancellation that takes a while to record
            wound_down.append("cancelled")
            raise

    async def cell() -> None:
        run_to_end(main)

    def interrupt() -> None:
        started.wait(30)
        main_thread = threading.main_thread().ident
        assert main_thread is not None
        signal.pthread_kill(main_thread, signal.SIGINT)

    # Python's own Ctrl-C handler, as a kernel has: pytest-xdist's workers ignore SIGINT.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt, daemon=True).start()
    # Not asyncio.run, whose own SIGINT handler cancels its task: a kernel's loop raises
    # KeyboardInterrupt where the cell is, as this one does.
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(cell())
    finally:
        loop.close()
        signal.signal(signal.SIGINT, handler)
    assert wound_down == ["cancelled"]


def test_a_client_works_where_a_loop_runs(home: Path) -> None:
    async def cell() -> list[str]:
        with Client(home) as client:
            client.list_runs()
            return [stack.name for stack in client.list_stacks()]

    assert asyncio.run(cell()) == ["default"]
