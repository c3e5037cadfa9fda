"""Configuration of the ``rabbitmq`` orchestrator flavor, checked when it is registered."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from conveyor.contracts import DEFAULT_PREFIX, Isolation
from conveyor.workers.limits import MAX_CONCURRENCY, UNACKED_S

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
RABBITMQ_CONSUMER_TIMEOUT_S = 1800.0


class RabbitMQOrchestratorConfig(BaseModel):
    """Configuration of the ``rabbitmq`` orchestrator flavor."""

    # NaN passes every comparison below, and an infinite heartbeat or lease never comes.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    url: SecretStr = Field(
        default=SecretStr(DEFAULT_URL),
        description="AMQP URL of the broker, with credentials and virtual host",
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        le=MAX_CONCURRENCY,
        description="Steps a worker process runs at once (and its prefetch)",
    )
    isolation: Isolation = Field(
        default="thread",
        description="Where sync step bodies run unless their @step says: 'thread', or "
        "'process' (a child process per attempt, killed at the step's timeout)",
    )
    prefix: str = Field(
        default=DEFAULT_PREFIX,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Start of every exchange and queue name of the stack",
    )
    pools: list[str] = Field(
        default_factory=list,
        description="Worker pools whose step queues are declared up front (besides 'default')",
    )
    consumer_timeout_s: float = Field(
        default=RABBITMQ_CONSUMER_TIMEOUT_S,
        gt=0,
        description="The broker's consumer_timeout (RabbitMQ's default is 30 minutes)",
    )
    step_timeout_s: float = Field(
        default=1500.0,
        gt=0,
        description="Longest a step attempt may run; must be below consumer_timeout_s",
    )
    announce_after_s: float = Field(
        default=0.1,
        ge=0,
        description="A step that finishes sooner publishes only its completion, no StepStarted",
    )
    heartbeat_s: float = Field(
        default=10.0, gt=0, description="How often a worker renews the leases of its running steps"
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="A running step whose worker sent no heartbeat for this long (frozen, "
        "cut off, dead) gets a new attempt elsewhere; must exceed twice heartbeat_s",
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="A step attempt whose worker died (or lost the broker, or its lease) this "
        "many times fails instead of being run again",
    )
    reconnect_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="First pause between connection attempts; it doubles with each failed "
        "attempt, up to reconnect_max_interval_s (with jitter)",
    )
    reconnect_max_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest pause between connection attempts (at least reconnect_interval_s)",
    )
    reconnect_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="A worker or controller whose broker stays unreachable this long exits "
        "non-zero (at start or later); unset: it keeps retrying for as long as it runs",
    )
    publish_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a publish waits for the broker to confirm it (across "
        "reconnections) before the caller hears the broker is unavailable",
    )
    watchdog_s: float = Field(
        default=60.0,
        gt=0,
        description="A worker or controller connected to the broker but without a consumer "
        "for this long exits non-zero (a broker that is down does not count)",
    )
    grace_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long running steps may finish"
    )
    trusted_packages: list[str] = Field(
        default_factory=list,
        description="Installed packages whose @step functions workers run without a code "
        "archive (steps of the run's own code always travel in its archive)",
    )

    @field_validator("url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        # Refused when registered, not when the first run cannot connect.
        problem = amqp_url_problem(value.get_secret_value())
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("trusted_packages")
    @classmethod
    def _package_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is not a top-level package name")
        return value

    @field_validator("lease_s")
    @classmethod
    def _above_heartbeats(cls, value: float, info: ValidationInfo) -> float:
        # One late or lost heartbeat must not cost an attempt.
        heartbeat = info.data.get("heartbeat_s", 10.0)
        if value <= 2 * heartbeat:
            raise ValueError(f"must exceed twice heartbeat_s ({heartbeat:g}s)")
        return value

    @field_validator("step_timeout_s")
    @classmethod
    def _below_consumer_timeout(cls, value: float, info: ValidationInfo) -> float:
        # A step that outlives consumer_timeout gets its channel closed by the broker (406),
        # and is delivered again while it still runs. Its delivery may have carried the
        # steps before it in a chain, run in place, and waited for a slot as a sibling.
        limit = info.data.get("consumer_timeout_s", RABBITMQ_CONSUMER_TIMEOUT_S)
        if value + UNACKED_S >= limit:
            raise ValueError(
                f"must be at least {UNACKED_S:g}s below the broker's consumer_timeout "
                f"({limit:g}s), which also covers the steps that ran before it on the "
                "same delivery; raise consumer_timeout in rabbitmq.conf and set "
                "consumer_timeout_s to match"
            )
        return value


def amqp_url_problem(url: str) -> str | None:
    """What keeps ``url`` from being an AMQP broker URL, or None. Never quotes the URL: it
    may hold a password."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return "is not a URL with a valid port, e.g. amqp://user:password@host:5672/vhost"
    if parts.scheme not in ("amqp", "amqps"):
        shown = f" (not {parts.scheme}://)" if parts.scheme else ""
        return f"must be an amqp:// or amqps:// URL{shown}"
    if not parts.hostname:
        return "must name the broker's host: amqp://user:password@host:5672/vhost"
    if port == 0:
        return "has port 0"
    if parts.fragment:
        return "must not have a #fragment"
    return None
