"""What the app holds: settings from ``create_app`` and the services its lifespan opens.

Both live on ``app.state`` (set by the factory and the lifespan), not in module globals, so
two apps in one process (tests) never share a store or a controller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from conveyor.contracts.limits import DEFAULT_MAX_STEPS
from conveyor.service.api.login_limit import LoginAttempts
from conveyor.service.api.pipeline_refs import TrustedPipelines
from conveyor.service.api.run_events import RunWatches
from conveyor.service.api.submitted_code import DEFAULT_MAX_CODE_BYTES, CheckedArchives
from conveyor.service.context import Services
from conveyor.service.gateway import RunGateway
from conveyor.service.home import Home
from conveyor.service.store.summaries import RunSummaries


@dataclass(frozen=True)
class ServerSettings:
    """How the app was created: which home, which stack to serve, which token to ask for,
    which pipelines a request may name."""

    home: Home
    pipelines: TrustedPipelines
    stack: str | None = None
    token: str | None = None
    """The admin's token when the server needs one (then nobody acts without a token)."""
    poll_interval_s: float = 0.5
    max_code_bytes: int = DEFAULT_MAX_CODE_BYTES
    """The largest code archive a client may upload."""
    max_steps: int = DEFAULT_MAX_STEPS
    """The most steps a submitted pipeline (a reference or a compiled spec) may have."""


@dataclass
class ApiState:
    """The open services of a running app."""

    gateway: RunGateway
    summaries: RunSummaries
    secret: bytes
    """Keys the dashboard's session cookies with each user's token digest; kept in the
    server's home (``security.session_secret``), so sessions outlive a restart."""
    archives: CheckedArchives = field(default_factory=CheckedArchives)
    """Code archives known to be in each stack's store (uploaded or checked there)."""
    watches: RunWatches = field(default_factory=RunWatches)
    """One reader of the store for all the followers of a run."""
    started: float = field(default_factory=time.monotonic)

    @property
    def services(self) -> Services:
        return self.gateway.services


def settings_of(request: Request) -> ServerSettings:
    settings = request.app.state.settings
    assert isinstance(settings, ServerSettings)
    return settings


def login_attempts_of(request: Request) -> LoginAttempts:
    attempts = request.app.state.login_attempts
    assert isinstance(attempts, LoginAttempts)
    return attempts


def state_of(request: Request) -> ApiState:
    """Dependency: the services of the app serving ``request``."""
    state = getattr(request.app.state, "conveyor", None)
    if not isinstance(state, ApiState):
        raise RuntimeError("the app's lifespan has not run: serve it with uvicorn")
    return state
