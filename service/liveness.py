"""Whether the process that owns an embedded run is still alive.

A pid alone can be reused after a crash, so a process is identified by its pid and its
start time (from /proc where there is one).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22 (starttime) comes after the command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> tuple[str, int, str]:
    """(host, pid, token) of the current process, as recorded on the runs it owns."""
    pid = os.getpid()
    return socket.gethostname(), pid, f"{pid}:{_start_time(pid)}"


def is_alive(pid: int, token: str) -> bool:
    """Whether the process ``pid`` that had ``token`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return token == f"{pid}:{_start_time(pid)}"
