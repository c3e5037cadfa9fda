"""A component's configuration is refused when it is registered, not when a run first uses it.

Checked through ``get_flavor(...).validate``, the path that the CLI's ``register`` and
``update`` and the HTTP API's component routes all take (``StackService``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.contracts import ComponentSpec, ComponentType, StackSpec, ValidationError
from conveyor.workers.flavors import get_flavor
from conveyor.workers.rabbitmq_config import amqp_url_problem
from conveyor.workers.stack_probes import probe_stack

ORCH, STORE = ComponentType.ORCHESTRATOR, ComponentType.ARTIFACT_STORE


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://x", "must be an amqp:// or amqps:// URL (not http://)"),
        ("nonsense", "must be an amqp:// or amqps:// URL"),
        ("", "must be an amqp:// or amqps:// URL"),
        ("amqp://", "must name the broker's host"),
        ("amqp://bob:pw@/vhost", "must name the broker's host"),
        ("amqp://bob:pw@mq:99999/", "valid port"),
        ("amqp://bob:pw@mq:port/", "valid port"),
        ("amqp://bob:pw@mq:0/", "port 0"),
        ("amqp://bob:pw@mq/v#x", "#fragment"),
    ],
)
def test_a_broker_url_that_cannot_be_amqp_is_refused_without_its_password(
    url: str, problem: str
) -> None:
    assert problem in (amqp_url_problem(url) or "")
    with pytest.raises(ValidationError) as refused:
        get_flavor(ORCH, "rabbitmq").validate({"url": url})
    assert problem in str(refused.value) and "key 'url'" in str(refused.value)
    assert "pw" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:guest@127.0.0.1:5672/",
        "amqps://bob:p%40ss@mq.example/prod?heartbeat=30",
        "amqp://mq",
        "amqp://[::1]:5672/%2F",
    ],
)
def test_broker_urls_aio_pika_takes_are_accepted(url: str) -> None:
    assert amqp_url_problem(url) is None
    get_flavor(ORCH, "rabbitmq").validate({"url": url})


def test_a_local_store_path_must_be_able_to_be_a_directory(tmp_path: Path) -> None:
    store = get_flavor(STORE, "local")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path, problem in [
        ("", "must name a directory"),
        ("   ", "must name a directory"),
        (str(a_file), "exists and is not a directory"),
        (f"{tmp_path}/a\x01b", "control characters"),
        (f"{tmp_path}/a\x00b", "control characters"),
    ]:
        with pytest.raises(ValidationError, match=problem):
            store.validate({"path": path})
    # A folder that does not exist yet is made by the first write.
    assert store.validate({"path": str(tmp_path / "new")}).model_dump() == {
        "path": str(tmp_path / "new")
    }


def test_an_s3_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be an http:// or https:// URL"):
        get_flavor(STORE, "s3").validate({"bucket": "abc", "endpoint_url": "ftp://x"})


@pytest.mark.parametrize(
    ("flavor", "config", "problem"),
    [
        ("rabbitmq", {"lease_s": float("nan")}, "finite number"),
        ("rabbitmq", {"heartbeat_s": float("inf")}, "finite number"),
        ("rabbitmq", {"concurrency": 1025}, "less than or equal to 1024"),
        ("local", {"concurrency": 10**20}, "less than or equal to 1024"),
    ],
)
def test_numbers_that_would_break_a_run_are_refused(
    flavor: str, config: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        get_flavor(ORCH, flavor).validate(config)


async def test_a_stored_config_that_is_no_longer_valid_shows_as_a_failed_probe(
    tmp_path: Path,
) -> None:
    """`stack describe` of a component stored before a check existed: the probe says why."""
    stack = StackSpec(
        id="s",
        name="old",
        components={
            ORCH: ComponentSpec(
                id="o", type=ORCH, name="mq", flavor="rabbitmq", config={"url": "http://x"}
            ),
            STORE: ComponentSpec(
                id="a", type=STORE, name="a", flavor="local", config={"path": str(tmp_path)}
            ),
        },
    )
    probes = await probe_stack(stack, timeout=2)
    assert not probes[ORCH].ok
    assert "must be an amqp:// or amqps:// URL" in probes[ORCH].detail
    assert probes[STORE].ok
