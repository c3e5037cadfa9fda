"""The Celery side of ``peers.py``: the same three trivial steps as ``overhead.py``.

Configured from the environment by ``peers.py``, which starts the worker with
``celery -A celery_tasks worker`` (RabbitMQ broker, Redis results, JSON, prefork).
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "conveyor_peers",
    broker=os.environ.get("PEERS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    backend=os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/0"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=os.environ.get("PEERS_QUEUE", "conveyor-peers"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task
def source() -> int:
    return 0


@app.task
def bump(x: int) -> int:
    return x + 1


@app.task
def join(xs: list[int]) -> int:
    return len(xs)
