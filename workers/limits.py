"""Bounds of a worker's configuration: plain numbers, light to import.

Apart from the flavors' config models so that the CLI's options (a range shown by
``conveyor worker start --help``) do not build those models.
"""

from __future__ import annotations

MAX_CONCURRENCY = 1024
"""The most steps one worker process runs at once (a thread, or a child process, each)."""
