"""Bounds of a worker: plain numbers, light to import.

Apart from the flavors' config models so that the CLI's options (a range shown by
``conveyor worker start --help``) do not build those models, and apart from the runtime so
that the rabbitmq flavor's configuration checks its timeouts against ``IN_PLACE_S``.
"""

from __future__ import annotations

MAX_CONCURRENCY = 1024
"""The most steps one worker process runs at once (a thread, or a child process, each)."""
IN_PLACE_S = 1.0
"""How long a delivery's steps may have taken for the next rider to run in place, on the
worker that ran its parent, instead of being forwarded through the broker: about the most
work a worker that dies makes another run again though its outcomes were recorded. A
delivery stays unacknowledged that long before its last step starts."""
