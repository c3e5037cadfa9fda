"""Step threads hand their results to the loop through ``Settler`` (workers/step_threads.py):
every future is settled, a cancelled one is left alone, and the threads that finish while
the loop is busy wake it once between them."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from conveyor.workers.step_threads import Settler


async def test_results_of_threads_that_finish_while_the_loop_is_busy_wake_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    wakes: list[Any] = []
    plain = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any) -> Any:
        wakes.append(callback)
        return plain(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    settler = Settler(loop)
    futures = [loop.create_future() for _ in range(50)]
    abandoned = futures[7]
    abandoned.cancel()  # its step timed out: the thread's late result is dropped

    def finish(i: int) -> None:
        settler.settle(futures[i], lambda: futures[i].set_result(i))

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # the loop is busy here: it runs no callback
    assert len(wakes) == 1
    done = await asyncio.gather(*(f for f in futures if f is not abandoned))
    assert done == [i for i in range(50) if i != 7]
    assert abandoned.cancelled()

    # Once the loop took them, the next result wakes it again.
    late = loop.create_future()
    threading.Thread(target=settler.settle, args=(late, lambda: late.set_result("late"))).start()
    assert await asyncio.wait_for(late, 5) == "late"
    assert len(wakes) == 2


def test_a_result_after_the_loop_closed_is_dropped_without_an_error() -> None:
    loop = asyncio.new_event_loop()
    settler = Settler(loop)
    future = loop.create_future()
    loop.close()
    settler.settle(future, lambda: future.set_result(1))
    time.sleep(0)
    assert not future.done()
