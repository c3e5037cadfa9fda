"""Threads for sync step bodies: as many as are busy, none ever waited for.

A body that never returns must not hold a slot that another step needs, so there is no fixed
number of threads: an idle thread takes the next body, else a new thread starts (how many run
at once is bounded by the broker's prefetch). A thread idle for ``IDLE_S`` ends. Threads are
daemons, so a stuck body does not keep its process from exiting, as a ThreadPoolExecutor's
threads would (they are joined at exit). A body's result reaches the loop through a
:class:`Settler`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

IDLE_S = 30.0

Job = Callable[[], None]


class StepThreads:
    """Runs each job in an idle thread or in a new one."""

    def __init__(self, name: str = "conveyor-step") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._idle = 0

    def run(self, job: Job) -> None:
        """Start ``job`` in an idle thread, or in a new one."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), name=self._name, daemon=True).start()

    def _serve(self, job: Job) -> None:
        while True:
            job()
            del job  # what it holds is freed while this thread waits
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        # Empty: no job was handed to an idle thread meanwhile, so this one
                        # may go. Else one was, and any idle thread may take it: this one.
                        if self._jobs.empty():
                            self._idle -= 1
                            return


class Settler:
    """Settles futures of one loop from other threads, waking the loop once for all those
    that finished while it was busy: each wake-up is a write to the loop's socket, a system
    call that lets go of the GIL in the step's thread and waits to take it back."""

    __slots__ = ("_settling", "_waking", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._settling: collections.deque[tuple[asyncio.Future[Any], Callable[[], None]]] = (
            collections.deque()
        )
        self._waking = False

    def settle(self, future: asyncio.Future[Any], settle: Callable[[], None]) -> None:
        """From another thread: ``settle()`` the future on its loop, unless it is done."""
        self._settling.append((future, settle))
        if self._waking:
            return  # a wake-up on its way takes this one too
        self._waking = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._on_loop)

    def _on_loop(self) -> None:
        # Cleared first: what is added after this sees it and wakes the loop again.
        self._waking = False
        settling = self._settling
        while settling:
            future, settle = settling.popleft()
            if not future.done():  # cancelled: the thread was abandoned
                settle()
