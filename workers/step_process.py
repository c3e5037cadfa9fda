"""A sync step's body in a child process of the worker, killed at its timeout.

The worker forks once the step's inputs are loaded: the child inherits the resolved function
and the inputs in memory, so nothing is pickled and nothing crosses but files. The child runs
the body, writes each output with its materializer into a private folder with a JSON manifest
(or the error, as JSON), its stdout and stderr going to a file there, and leaves with
``os._exit``. The parent waits without blocking its event loop (a pidfd on Linux), kills the
child at the timeout or when cancelled, and stores the files itself: the child never touches
the artifact store, the broker or any other client of the worker (an S3 or AMQP connection
does not survive a fork).

Caveat of forking a process that has threads: only the forking thread goes on in the child.
A lock that another thread held at that instant (inside a C library, or in Python code that
does not re-initialize it after a fork) stays taken for ever in the child, which then hangs
until its timeout kills it. Python re-initializes its own locks (the GIL, imports, logging),
and the child calls nothing of the worker's but the materializers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from conveyor.contracts import ConveyorError
from conveyor.workers import materializers, step_logs
from conveyor.workers.step_failures import error_line, retry_after, user_traceback

MANIFEST = "manifest.json"
OUTPUT_LOG = "output.log"
KILL_GRACE_S = 2.0
"""How long a child may take to end after SIGTERM before it gets SIGKILL."""

_PR_SET_PDEATHSIG = 1
REAPED_ELSEWHERE = 255
"""The exit code taken when another waiter reaped the child: its manifest tells the rest."""


def _prctl() -> Callable[..., int] | None:
    # Looked up in the parent: the child must not take the dynamic loader's lock, which
    # another thread may have held at the fork.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _prctl()


class StepBodyFailed(Exception):
    """A step body's failure as text: its error line, traceback, whether to retry, and
    after how long if the step said (``Retry``)."""

    def __init__(
        self,
        error: str,
        traceback_text: str | None,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(error)
        self.error = error
        self.traceback = traceback_text
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, exc: BaseException) -> StepBodyFailed:
        """The failure that ``exc``, being handled now, makes of a step."""
        retryable = exc.retryable if isinstance(exc, ConveyorError) else True
        return cls(error_line(exc), user_traceback(exc), retryable, retry_after(exc))


def signal_death(code: int) -> str:
    """What a step's process that ended with ``-code`` (a signal) died of, for its error."""
    number = -code
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = "unknown"
    hint = {
        int(signal.SIGKILL): ": out of memory? (the kernel's OOM killer sends SIGKILL)",
        int(signal.SIGSEGV): ": a crash in native code?",
        int(signal.SIGBUS): ": a crash in native code?",
        int(signal.SIGABRT): ": a crash in native code?",
    }.get(number, "")
    return f"the step's process was killed by signal {number} ({name}){hint}"


@dataclass(frozen=True)
class OutputFile:
    """One output the child wrote: its file and how to read it back."""

    path: str
    materializer: str
    data_type: str


class Child:
    """A forked child: its exit status without blocking the loop, and a way to end it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            # No pidfd (not Linux, or an old kernel): a thread waits for this one child.
            threading.Thread(target=self._wait_in_thread, daemon=True).start()
        else:
            self._loop.add_reader(pidfd, self._reap, pidfd)

    def _reap(self, pidfd: int | None = None) -> None:
        # Reaped here, on the loop, in the same step that settles ``_exited``: until it is
        # done, the pid cannot belong to another process, so signalling it is safe.
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = REAPED_ELSEWHERE  # by a SIGCHLD handler of the application
        if not self._exited.done():
            self._exited.set_result(code)

    def _wait_in_thread(self) -> None:
        # Waits for the exit without reaping: reaping is the loop's (see _reap).
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._reap)

    async def wait(self) -> int:
        """The exit code (``-N`` for signal N), once the child ended and was reaped."""
        # Shielded: cancelling a waiter does not cancel the reaping.
        return await asyncio.shield(self._exited)

    async def end(self) -> None:
        """SIGTERM, SIGKILL after KILL_GRACE_S, and wait until it is reaped.

        Cancelled meanwhile, the SIGKILL is still sent and the child still reaped.
        """
        if self._exited.done():
            return
        self._signal(signal.SIGTERM)
        kill = self._loop.call_later(KILL_GRACE_S, self._signal, signal.SIGKILL)
        self._exited.add_done_callback(lambda _: kill.cancel())
        await self.wait()

    def _signal(self, sig: signal.Signals) -> None:
        if not self._exited.done():
            # Not reaped yet, so the pid is still this child's (a zombie at worst).
            os.kill(self.pid, sig)


def start(
    produce: Callable[[], dict[str, Any]], folder: str, *, allow_pickle: bool, step: str
) -> Child:
    """Fork a child that writes what ``produce()`` returns into ``folder``; the loop's side.

    ``produce`` runs only in the child: it calls the body and names its outputs.
    """
    parent = os.getpid()
    # Text buffered now would be written by the child too when it flushes.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns on every fork of a process with threads: the caveat is known and
        # documented above (module docstring and docs/steps.md), not news at each step.
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child; it never returns from here
        _child(produce, folder, allow_pickle=allow_pickle, step=step, parent=parent)
    return Child(pid)


def _child(
    produce: Callable[[], dict[str, Any]],
    folder: str,
    *,
    allow_pickle: bool,
    step: str,
    parent: int,
) -> NoReturn:
    code = 70  # EX_SOFTWARE: this very code failed
    try:
        _detach(folder, parent)
        try:
            manifest: dict[str, Any] = {
                "outputs": {
                    name: _write(folder, index, value, allow_pickle, f"output {name!r} of {step!r}")
                    for index, (name, value) in enumerate(produce().items())
                }
            }
        except BaseException as exc:
            failed = StepBodyFailed.of(exc)
            manifest = {
                "error": failed.error,
                "traceback": failed.traceback,
                "retryable": failed.retryable,
                "retry_after_s": failed.retry_after_s,
            }
        staged = os.path.join(folder, MANIFEST + ".tmp")
        with open(staged, "w") as handle:
            json.dump(manifest, handle)
        os.rename(staged, os.path.join(folder, MANIFEST))
        code = 0
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


def _detach(folder: str, parent: int) -> None:
    """Make the forked child stand on its own: signals, parent's death, output."""
    # The worker's asyncio signal handling would hand this child's signals to the parent's
    # loop (through the wakeup fd they share): a SIGTERM must end the child, nothing else.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a killed worker leaves no child behind
    if os.getppid() != parent:  # the worker died before that took effect
        os._exit(1)
    log = os.open(os.path.join(folder, OUTPUT_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    # A new stream (the old ones may write elsewhere, as under pytest's capture), line by
    # line so that what it printed before a SIGKILL is in the file.
    step_logs.only_into(
        open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    )


def _write(folder: str, index: int, value: object, allow_pickle: bool, what: str) -> dict[str, str]:
    materializer = materializers.choose(value, allow_pickle=allow_pickle, what=what)
    name = f"output-{index}"
    materializer.save(value, os.path.join(folder, name))
    return {
        "file": name,
        "materializer": materializer.name,
        "data_type": materializers.type_name(value),
    }


def outcome(folder: str, code: int) -> dict[str, OutputFile]:
    """The outputs a child that ended with ``code`` left in ``folder``; else StepBodyFailed."""
    if code < 0:
        raise StepBodyFailed(signal_death(code), None, True)
    try:
        manifest = json.loads(Path(folder, MANIFEST).read_text())
    except FileNotFoundError:
        manifest = None
    if manifest is None:
        raise StepBodyFailed(
            f"the step's process exited with status {code} before its body returned "
            "(os._exit, or a crash)",
            None,
            True,
        )
    if "error" in manifest:
        raise StepBodyFailed(
            manifest["error"],
            manifest["traceback"],
            manifest["retryable"],
            manifest.get("retry_after_s"),
        )
    outputs: dict[str, OutputFile] = {}
    for name, entry in manifest["outputs"].items():
        path = os.path.join(folder, os.path.basename(entry["file"]))
        outputs[name] = OutputFile(path, entry["materializer"], entry["data_type"])
    return outputs


def printed(folder: str, limit: int) -> str:
    """The end (at most ``limit`` bytes) of what the child printed, as text."""
    path = os.path.join(folder, OUTPUT_LOG)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(max(0, size - limit))
            data = handle.read()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace")
    return text if size <= limit else f"[... {size - limit} bytes cut ...]\n{text}"


def private_folder() -> str:
    """A new folder that only this user reads, for one child's files."""
    return tempfile.mkdtemp(prefix="conveyor-step-")
