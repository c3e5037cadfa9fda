"""What a step prints and logs, captured per attempt while the worker's console still shows it.

Steps run concurrently, in threads and on the event loop, so capture follows the context:
``sys.stdout``, ``sys.stderr`` and the root logger are wrapped while a worker pool runs, and
each write goes to the buffer of the attempt whose context made it (contexts are copied
into the step's thread), as well as to the original stream.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

MAX_LOG_CHARS = 1_000_000

_buffer: ContextVar[TextIO | None] = ContextVar("conveyor_step_log", default=None)
_echo_warnings = True
_pools = 0  # worker pools of this process that installed the capture and still run


class _Tee(io.TextIOBase):
    """A text stream that also copies writes into the current attempt's buffer."""

    def __init__(self, original: TextIO) -> None:
        self.original = original

    def write(self, text: str) -> int:
        buffer = _buffer.get()
        if buffer is not None:
            buffer.write(text)
        return self.original.write(text)

    def flush(self) -> None:
        self.original.flush()

    def isatty(self) -> bool:
        return self.original.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.original.encoding

    def __getattr__(self, name: str) -> object:
        # What else the stream has, its owner still reaches: Jupyter's kernel tells its
        # stream which cell prints (``set_parent``), else a later cell's output is lost.
        return getattr(self.original, name)


class _CaptureHandler(logging.Handler):
    """Copies log records made inside an attempt into its buffer."""

    def emit(self, record: logging.LogRecord) -> None:
        buffer = _buffer.get()
        if buffer is not None:
            buffer.write(self.format(record) + "\n")
        if (
            _echo_warnings
            and record.levelno >= logging.WARNING
            and logging.getLogger().handlers == [self]
        ):
            # Being the root's only handler turns off logging's last-resort printing of
            # warnings to stderr: keep doing what it did.
            sys.stderr.write(record.getMessage() + "\n")


def install() -> None:
    """Wrap stdout, stderr and the root logger of this process while a worker pool runs
    (once for every pool of the process; ``uninstall`` when each stops).

    Log levels are the process's own: a step's ``logging.info`` is captured where the
    application lets INFO through.
    """
    global _pools
    _pools += 1
    if not isinstance(sys.stdout, _Tee):
        sys.stdout = _Tee(sys.stdout)
    if not isinstance(sys.stderr, _Tee):
        sys.stderr = _Tee(sys.stderr)
    root = logging.getLogger()
    if not any(isinstance(h, _CaptureHandler) for h in root.handlers):
        handler = _CaptureHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def uninstall() -> None:
    """Undo ``install()`` once the last pool of the process stopped: an application that
    embeds Conveyor gets its streams and root logger back as they were (a stream another
    part wrapped or replaced since is left as it is)."""
    global _pools
    _pools = max(0, _pools - 1)
    if _pools:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, _Tee):
            setattr(sys, name, stream.original)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CaptureHandler)]:
        root.removeHandler(handler)


@contextmanager
def capturing() -> Iterator[io.StringIO]:
    """Collect what the current context prints and logs until the block ends."""
    buffer = io.StringIO()
    token = _buffer.set(buffer)
    try:
        yield buffer
    finally:
        _buffer.reset(token)


def only_into(stream: TextIO) -> None:
    """In a step's child process: all it prints and logs goes to ``stream`` only, once (the
    worker adds it to the attempt's log and its console afterwards)."""
    global _echo_warnings
    _echo_warnings = False
    _buffer.set(stream)
    sys.stdout = sys.stderr = stream


def echo(text: str) -> None:
    """Add ``text`` to the current attempt's log and the console, as if printed here (what a
    step's child process printed into a file)."""
    if not text:
        return
    buffer = _buffer.get()
    if buffer is not None:
        buffer.write(text)
    stream = sys.stdout
    (stream.original if isinstance(stream, _Tee) else stream).write(text)


def text_of(buffer: io.StringIO) -> str:
    """The captured text, keeping the end when it is longer than MAX_LOG_CHARS."""
    text = buffer.getvalue()
    if len(text) <= MAX_LOG_CHARS:
        return text
    return f"[... {len(text) - MAX_LOG_CHARS} characters cut ...]\n" + text[-MAX_LOG_CHARS:]
