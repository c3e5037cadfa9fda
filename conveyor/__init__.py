"""Conveyor: event-driven ML pipelines on stacks.

from conveyor import pipeline, step

@step
def make() -> int: return 41

@step
def inc(x: int) -> int: return x + 1

@pipeline
def p(): inc(make())

run = p()  # runs on the active stack; raises RunFailed if the run fails
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.contracts.first_use import names_on_first_use

if TYPE_CHECKING:
    from conveyor.contracts import (
        ArtifactRef,
        ConveyorError,
        Fatal,
        Materializer,
        Retry,
        RunFailed,
        RunRecord,
        RunStatus,
        StackSpec,
        StepRecord,
        StepStatus,
    )
    from conveyor.service.client import Client
    from conveyor.service.engine import AsyncRun, Conveyor
    from conveyor.service.handles import RunHandle
    from conveyor.service.pipelines import PipelineDefinition, pipeline
    from conveyor.workers.materializers import register_materializer
    from conveyor.workers.steps import StepDefinition, step

# Each public name and the module it lives in. Imported on first use, so that `conveyor`
# and its subpackages (the CLI above all) do not pay for the engine, numpy and aio-pika.
_SOURCES = {
    "ArtifactRef": "conveyor.contracts",
    "ConveyorError": "conveyor.contracts",
    "Fatal": "conveyor.contracts",
    "Retry": "conveyor.contracts",
    "Materializer": "conveyor.contracts",
    "RunFailed": "conveyor.contracts",
    "RunRecord": "conveyor.contracts",
    "RunStatus": "conveyor.contracts",
    "StackSpec": "conveyor.contracts",
    "StepRecord": "conveyor.contracts",
    "StepStatus": "conveyor.contracts",
    "Client": "conveyor.service.client",
    "AsyncRun": "conveyor.service.engine",
    "Conveyor": "conveyor.service.engine",
    "RunHandle": "conveyor.service.handles",
    "PipelineDefinition": "conveyor.service.pipelines",
    "pipeline": "conveyor.service.pipelines",
    "StepDefinition": "conveyor.workers.steps",
    "step": "conveyor.workers.steps",
    "register_materializer": "conveyor.workers.materializers",
}

__all__ = [
    "ArtifactRef",
    "AsyncRun",
    "Client",
    "Conveyor",
    "ConveyorError",
    "Fatal",
    "Materializer",
    "PipelineDefinition",
    "Retry",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunStatus",
    "StackSpec",
    "StepDefinition",
    "StepRecord",
    "StepStatus",
    "pipeline",
    "register_materializer",
    "step",
]


__getattr__, __dir__ = names_on_first_use(__name__, _SOURCES, globals())
