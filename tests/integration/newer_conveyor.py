"""The ``conveyor`` command as a newer release would run it: ``python -m
tests.integration.newer_conveyor ARGS`` runs ``conveyor ARGS`` whose RabbitMQ messages carry
a field this release does not know (in a ``RunRequested``'s spec, a ``StepReady``'s step
and a worker's ``StepSucceeded`` or ``StepFailed``, as a release that added one would send;
in the events of the types ``$CONVEYOR_TEST_NEWER_TYPES`` lists instead, when it is set,
which may name ``AttemptsCancelled`` too, and ``StepsDone``, in each outcome it carries),
and which says it is Conveyor ``NEWER_VERSION``.
"""

from __future__ import annotations

import json
import os

from conveyor.contracts import (
    AttemptsCancelled,
    Event,
    RunRequested,
    StepFailed,
    StepReady,
    StepSucceeded,
    encode_event,
)
from conveyor.service.cli.app import main
from conveyor.workers import broker_rabbitmq

NEWER_VERSION = "99.1.0"
NEW_FIELD = "placement"
"""A field of a later release (in each message of ``_newer_encoding``)."""
TYPES_ENV = "CONVEYOR_TEST_NEWER_TYPES"
DEFAULT_TYPES = "RunRequested,StepReady,StepSucceeded,StepFailed"


def _newer_encoding(event: Event) -> bytes:
    body = json.loads(encode_event(event))
    if event.type not in os.environ.get(TYPES_ENV, DEFAULT_TYPES).split(","):
        return json.dumps(body).encode()
    if isinstance(event, RunRequested) and body.get("spec") is not None:
        body["spec"][NEW_FIELD] = "eu-west"
    if isinstance(event, StepReady):
        body["step"][NEW_FIELD] = "eu-west"
    if isinstance(event, StepSucceeded | StepFailed | AttemptsCancelled):
        body[NEW_FIELD] = "eu-west"
    if event.type == "StepsDone":  # the outcomes it carries are a worker's reports
        for outcome in body["outcomes"]:
            outcome[NEW_FIELD] = "eu-west"
    return json.dumps(body).encode()


def as_newer_release() -> None:
    """Make this process's RabbitMQ messages look like a newer release's."""
    broker_rabbitmq.encode_event = _newer_encoding  # type: ignore[assignment]
    stamp = getattr(broker_rabbitmq, "conveyor_version", None)
    if stamp is not None:  # the releases that stamp their version on what they publish
        broker_rabbitmq.conveyor_version = lambda: NEWER_VERSION  # type: ignore[attr-defined]


if __name__ == "__main__":
    as_newer_release()
    main()
