"""Bounds of a worker: plain numbers, light to import.

Apart from the flavors' config models so that the CLI's options (a range shown by
``conveyor worker start --help``) do not build those models, and apart from the runtime so
that the rabbitmq flavor's configuration checks its timeouts against ``UNACKED_S``.
"""

from __future__ import annotations

MAX_CONCURRENCY = 1024
"""The most steps one worker process runs at once (a thread, or a child process, each)."""
MAX_ACTIVE_RUNS = 100_000
"""The most runs an embedded stack may have going at once (``max_active_runs``)."""
RUNS_PER_SLOT = 2
"""An embedded stack's runs going at once by default, per step its pool runs at once."""
IN_PLACE_S = 1.0
"""How long a delivery's steps may have taken for the next rider to run in place, on the
worker that ran its parent, instead of being forwarded through the broker: about the most
work a worker that dies makes another run again though its outcomes were recorded. A
delivery stays unacknowledged that long before its last step starts."""
HAND_BACK_S = 1.0
"""How long a step that came as a sibling of another (``StepReady.siblings``) waits for a
free slot on the worker that took their message; then it is handed back, a message of its
own for any worker, so that a fan-out of long steps spreads over every worker's slots."""
UNACKED_S = HAND_BACK_S + IN_PLACE_S
"""The longest a delivery stays unacknowledged before its last step starts: a sibling
waits for a slot, then the chain riding on it runs in place."""
