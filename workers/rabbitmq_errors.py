"""Errors of the ``rabbitmq`` broker, shared by its publishing and its consuming sides."""

from __future__ import annotations

import aiormq

from conveyor.contracts import ConveyorError

# Errors after which the same operation can succeed once the robust connection is back.
TRANSIENT = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class BrokerUnavailable(ConveyorError):
    """The broker did not take a message in time; the caller may try again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


RETRYABLE = (*TRANSIENT, BrokerUnavailable)
