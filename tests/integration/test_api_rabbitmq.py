"""The server on a rabbitmq stack: health and queue depths from the real broker.

No controller runs here (on a service stack it is ``conveyor controller start``), so a
submitted run stays queued: the API answers 202 and the run-requests queue shows it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from conveyor.service.api import create_app
from tests.integration.api_helpers import BASE_URL, QUICKSTART, assert_error
from tests.integration.rabbitmq_support import STACK, register_stack, vhost
from tests.integration.tcp_proxy import TcpProxy

__all__ = ["vhost"]  # fixtures

pytestmark = pytest.mark.rabbitmq


async def test_health_and_queue_depths_on_a_rabbitmq_stack(
    vhost: str, home: Path, tmp_path: Path
) -> None:
    await register_stack(vhost, tmp_path / "artifacts", home=home)
    app = create_app(home, stack=STACK, record_timeout_s=0.5)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as api:
            health = await api.get("/healthz")
            assert health.status_code == 200, health.text
            checks = health.json()["checks"]
            assert checks["broker"] == {"ok": True, "detail": "RabbitMQ answers"}
            assert "outside this server" in checks["controller"]["detail"]

            runs_queue = f'conveyor_queue_depth{{stack="{STACK}",queue="conveyor.{STACK}.runs"}}'
            assert f"{runs_queue} 0" in (await api.get("/metrics")).text
            submitted = await api.post("/api/runs", json={"pipeline": QUICKSTART})
            assert submitted.status_code == 202, submitted.text
            assert submitted.json()["status"] == "queued"  # no controller has taken it
            assert submitted.headers["location"] == f"/api/runs/{submitted.json()['id']}"
            for _ in range(50):
                if f"{runs_queue} 1" in (await api.get("/metrics")).text:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError((await api.get("/metrics")).text)
            text = (await api.get("/metrics")).text
            assert not any(line.startswith("conveyor_controller_up{") for line in text.splitlines())


async def test_submitting_while_the_broker_is_down_is_a_503(
    vhost: str, home: Path, tmp_path: Path
) -> None:
    with TcpProxy() as proxy:
        await register_stack(proxy.url(vhost), tmp_path / "artifacts", home=home)
        app = create_app(home, stack=STACK, record_timeout_s=0.5)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as api:
                proxy.stop()  # the broker is gone: the listener and every connection
                for _ in range(2):
                    submitted = await asyncio.wait_for(
                        api.post("/api/runs", json={"pipeline": QUICKSTART}), 60
                    )
                    assert_error(submitted, 503, "RabbitMQ", "try again")
                    assert submitted.headers["Retry-After"]
