"""What both planes agree on: events, records, the pipeline spec, topology and Protocols."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.contracts.enums import (
        FINISHED_RUN_STATUSES,
        FINISHED_STEP_STATUSES,
        ComponentType,
        Role,
        RunStatus,
        StepStatus,
    )
    from conveyor.contracts.errors import (
        AmbiguousId,
        ArtifactUnreadable,
        ConflictError,
        ConveyorError,
        Fatal,
        NotAllowed,
        NotFoundError,
        OutsideStore,
        Retry,
        RunFailed,
        StoreUnavailable,
        UntrustedStep,
        ValidationError,
    )
    from conveyor.contracts.events import (
        COMPLETION_TYPES,
        EVENT_TYPES,
        SCHEMA_VERSION,
        AttemptsCancelled,
        Envelope,
        Event,
        MalformedEvent,
        RunCancelRequested,
        RunFinished,
        RunProgress,
        RunRequested,
        StepFailed,
        StepHeartbeat,
        StepReady,
        StepStarted,
        StepStatusChanged,
        StepSucceeded,
        WorkerFacts,
        encode_event,
        event_json_schemas,
        new_id,
        parse_event,
        progress_of,
        utcnow,
    )
    from conveyor.contracts.limits import (
        DEFAULT_MAX_RETRY_DELAY_S,
        MAX_BACKOFF,
        MAX_RETRIES,
        MAX_RETRY_DELAY_S,
    )
    from conveyor.contracts.models import (
        ArtifactRecord,
        ArtifactRef,
        BlobRef,
        ComponentSpec,
        RunRecord,
        StackSpec,
        StepRecord,
        UserRecord,
    )
    from conveyor.contracts.pipeline_spec import (
        DEFAULT_POOL,
        InputBinding,
        Isolation,
        OutputSelector,
        PipelineSpec,
        RetryPolicy,
        StepSpec,
    )
    from conveyor.contracts.protocols import (
        ArtifactStore,
        Broker,
        Delivery,
        DeliveryHandler,
        Materializer,
        StatusHandler,
        Subscription,
        UnreadableDelivery,
        UnreadableHandler,
        UnreadableStatusHandler,
    )
    from conveyor.contracts.topology import (
        DEFAULT_PREFIX,
        Topology,
        is_control_event,
        is_status_event,
    )
    from conveyor.contracts.unreadable import (
        Identity,
        Unreadable,
        read_identity,
        read_version,
        unreadable,
    )

# Each public name and the module it lives in. Imported on first use, as in
# conveyor/__init__.py: a part that needs the records (the CLI's ``stack list``) or the enums
# alone (``conveyor --help``) does not build the models of every event and the pipeline spec.
_SOURCES = {
    "FINISHED_RUN_STATUSES": "conveyor.contracts.enums",
    "FINISHED_STEP_STATUSES": "conveyor.contracts.enums",
    "ComponentType": "conveyor.contracts.enums",
    "Role": "conveyor.contracts.enums",
    "RunStatus": "conveyor.contracts.enums",
    "StepStatus": "conveyor.contracts.enums",
    "AmbiguousId": "conveyor.contracts.errors",
    "ArtifactUnreadable": "conveyor.contracts.errors",
    "ConflictError": "conveyor.contracts.errors",
    "ConveyorError": "conveyor.contracts.errors",
    "Fatal": "conveyor.contracts.errors",
    "NotAllowed": "conveyor.contracts.errors",
    "NotFoundError": "conveyor.contracts.errors",
    "OutsideStore": "conveyor.contracts.errors",
    "Retry": "conveyor.contracts.errors",
    "RunFailed": "conveyor.contracts.errors",
    "StoreUnavailable": "conveyor.contracts.errors",
    "UntrustedStep": "conveyor.contracts.errors",
    "ValidationError": "conveyor.contracts.errors",
    "AttemptsCancelled": "conveyor.contracts.events",
    "COMPLETION_TYPES": "conveyor.contracts.events",
    "EVENT_TYPES": "conveyor.contracts.events",
    "Envelope": "conveyor.contracts.events",
    "Event": "conveyor.contracts.events",
    "MalformedEvent": "conveyor.contracts.events",
    "RunCancelRequested": "conveyor.contracts.events",
    "RunFinished": "conveyor.contracts.events",
    "RunProgress": "conveyor.contracts.events",
    "RunRequested": "conveyor.contracts.events",
    "SCHEMA_VERSION": "conveyor.contracts.events",
    "StepFailed": "conveyor.contracts.events",
    "StepHeartbeat": "conveyor.contracts.events",
    "StepReady": "conveyor.contracts.events",
    "StepStarted": "conveyor.contracts.events",
    "StepStatusChanged": "conveyor.contracts.events",
    "StepSucceeded": "conveyor.contracts.events",
    "WorkerFacts": "conveyor.contracts.events",
    "encode_event": "conveyor.contracts.events",
    "event_json_schemas": "conveyor.contracts.events",
    "new_id": "conveyor.contracts.events",
    "parse_event": "conveyor.contracts.events",
    "progress_of": "conveyor.contracts.events",
    "utcnow": "conveyor.contracts.events",
    "ArtifactRecord": "conveyor.contracts.models",
    "ArtifactRef": "conveyor.contracts.models",
    "BlobRef": "conveyor.contracts.models",
    "ComponentSpec": "conveyor.contracts.models",
    "RunRecord": "conveyor.contracts.models",
    "StackSpec": "conveyor.contracts.models",
    "StepRecord": "conveyor.contracts.models",
    "UserRecord": "conveyor.contracts.models",
    "DEFAULT_MAX_RETRY_DELAY_S": "conveyor.contracts.limits",
    "DEFAULT_POOL": "conveyor.contracts.pipeline_spec",
    "InputBinding": "conveyor.contracts.pipeline_spec",
    "Isolation": "conveyor.contracts.pipeline_spec",
    "MAX_BACKOFF": "conveyor.contracts.limits",
    "MAX_RETRIES": "conveyor.contracts.limits",
    "MAX_RETRY_DELAY_S": "conveyor.contracts.limits",
    "OutputSelector": "conveyor.contracts.pipeline_spec",
    "PipelineSpec": "conveyor.contracts.pipeline_spec",
    "RetryPolicy": "conveyor.contracts.pipeline_spec",
    "StepSpec": "conveyor.contracts.pipeline_spec",
    "ArtifactStore": "conveyor.contracts.protocols",
    "Broker": "conveyor.contracts.protocols",
    "Delivery": "conveyor.contracts.protocols",
    "DeliveryHandler": "conveyor.contracts.protocols",
    "Materializer": "conveyor.contracts.protocols",
    "StatusHandler": "conveyor.contracts.protocols",
    "Subscription": "conveyor.contracts.protocols",
    "UnreadableDelivery": "conveyor.contracts.protocols",
    "UnreadableHandler": "conveyor.contracts.protocols",
    "UnreadableStatusHandler": "conveyor.contracts.protocols",
    "DEFAULT_PREFIX": "conveyor.contracts.topology",
    "Topology": "conveyor.contracts.topology",
    "is_control_event": "conveyor.contracts.topology",
    "is_status_event": "conveyor.contracts.topology",
    "Identity": "conveyor.contracts.unreadable",
    "Unreadable": "conveyor.contracts.unreadable",
    "read_identity": "conveyor.contracts.unreadable",
    "read_version": "conveyor.contracts.unreadable",
    "unreadable": "conveyor.contracts.unreadable",
}

__all__ = [
    "COMPLETION_TYPES",
    "DEFAULT_MAX_RETRY_DELAY_S",
    "DEFAULT_POOL",
    "DEFAULT_PREFIX",
    "EVENT_TYPES",
    "FINISHED_RUN_STATUSES",
    "FINISHED_STEP_STATUSES",
    "MAX_BACKOFF",
    "MAX_RETRIES",
    "MAX_RETRY_DELAY_S",
    "SCHEMA_VERSION",
    "AmbiguousId",
    "ArtifactRecord",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactUnreadable",
    "AttemptsCancelled",
    "BlobRef",
    "Broker",
    "ComponentSpec",
    "ComponentType",
    "ConflictError",
    "ConveyorError",
    "Delivery",
    "DeliveryHandler",
    "Envelope",
    "Event",
    "Fatal",
    "Identity",
    "InputBinding",
    "Isolation",
    "MalformedEvent",
    "Materializer",
    "NotAllowed",
    "NotFoundError",
    "OutputSelector",
    "OutsideStore",
    "PipelineSpec",
    "Retry",
    "RetryPolicy",
    "Role",
    "RunCancelRequested",
    "RunFailed",
    "RunFinished",
    "RunProgress",
    "RunRecord",
    "RunRequested",
    "RunStatus",
    "StackSpec",
    "StatusHandler",
    "StepFailed",
    "StepHeartbeat",
    "StepReady",
    "StepRecord",
    "StepSpec",
    "StepStarted",
    "StepStatus",
    "StepStatusChanged",
    "StepSucceeded",
    "StoreUnavailable",
    "Subscription",
    "Topology",
    "Unreadable",
    "UnreadableDelivery",
    "UnreadableHandler",
    "UnreadableStatusHandler",
    "UntrustedStep",
    "UserRecord",
    "ValidationError",
    "WorkerFacts",
    "encode_event",
    "event_json_schemas",
    "is_control_event",
    "is_status_event",
    "new_id",
    "parse_event",
    "progress_of",
    "read_identity",
    "read_version",
    "unreadable",
    "utcnow",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'conveyor.contracts' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # found once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Contracts(types.ModuleType):
    """This package, whose ``unreadable`` is the function, never the submodule of that name.

    Importing a submodule sets it on its package; eager imports here used to set the
    function over it, and now that names are imported on first use, this keeps it so
    whichever comes first.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SOURCES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Contracts
