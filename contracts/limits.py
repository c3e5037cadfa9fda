"""The bounds of a pipeline and its retries: plain numbers, light to import.

Apart from ``pipeline_spec`` so that the error tree and the CLI's options (a default shown by
``conveyor --help``) do not build the spec's models.
"""

from __future__ import annotations

MAX_RETRIES = 100
"""The most retries a step may ask for."""
MAX_RETRY_DELAY_S = 86_400.0
"""The longest any wait before a retry may be: a day."""
DEFAULT_MAX_RETRY_DELAY_S = 300.0
MAX_BACKOFF = 10.0
"""The most each wait may grow over the one before."""
MAX_STEPS = 100_000
"""The most step invocations one pipeline may hold."""
DEFAULT_MAX_STEPS = 10_000
"""The most steps a pipeline submitted to a server may have, unless its ``--max-steps`` says."""
