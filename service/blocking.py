"""Run a coroutine to its end from synchronous code, whether or not this thread runs a loop.

A script has no event loop, so ``asyncio.run`` serves. Jupyter and IPython run one in the
thread that executes a cell, where ``asyncio.run`` refuses: there the coroutine gets a loop
of its own in a worker thread, and the caller blocks until it ends, as a script would (a
cell blocks anyway). Ctrl+C (a kernel interrupt) cancels the coroutine and waits for it to
wind down, as ``asyncio.run`` does on SIGINT in a script.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_to_end(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``main()`` run to its end on a loop; its result or its exception."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    return _in_own_thread(main)


def _in_own_thread(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
    running: concurrent.futures.Future[asyncio.Task[Any]] = concurrent.futures.Future()

    async def body() -> T:
        task = asyncio.current_task()
        assert task is not None
        running.set_result(task)
        return await main()

    def serve() -> None:
        try:
            outcome.set_result(asyncio.run(body()))
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.set_exception(exc)

    # The caller's context (log bindings, say) goes along; a daemon, so that a step body
    # that never returns does not keep the interpreter from exiting.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(serve,), name="conveyor-run", daemon=True)
    try:
        thread.start()  # which may already run ``main``: Ctrl+C cancels it from here on
        return outcome.result()
    except KeyboardInterrupt:
        _cancel(running, outcome)
        raise


def _cancel(
    running: concurrent.futures.Future[asyncio.Task[Any]],
    outcome: concurrent.futures.Future[Any],
) -> None:
    """Cancel the task of the worker thread's loop and wait until it ended (a second
    Ctrl+C stops waiting)."""
    concurrent.futures.wait([running, outcome], return_when=concurrent.futures.FIRST_COMPLETED)
    if running.done() and not outcome.done():
        task = running.result()
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to cancel
            task.get_loop().call_soon_threadsafe(task.cancel)
    concurrent.futures.wait([outcome])


class LoopThread:
    """An event loop in a daemon thread of its own, serving one caller's calls until
    ``close()``: for an object that keeps loop-bound state across synchronous calls (a
    ``Client``) where a loop already runs in the caller's thread. Same shape as
    ``asyncio.Runner``."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the thread's loop; block until it ends; Ctrl+C cancels it."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            concurrent.futures.wait([future])
            raise

    def close(self) -> None:
        """Stop the loop and its thread; idempotent."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
