"""Threads for sync step bodies: as many as are busy, none ever waited for.

A body that never returns must not hold a slot that another step needs, so there is no fixed
number of threads: an idle thread takes the next body, else a new thread starts (how many run
at once is bounded by the broker's prefetch). A thread idle for ``IDLE_S`` ends. Threads are
daemons, so a stuck body does not keep its process from exiting, as a ThreadPoolExecutor's
threads would (they are joined at exit).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

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
