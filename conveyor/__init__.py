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

from conveyor.contracts import (
    ArtifactRef,
    ConveyorError,
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
from conveyor.workers.steps import StepDefinition, step

__all__ = [
    "ArtifactRef",
    "AsyncRun",
    "Client",
    "Conveyor",
    "ConveyorError",
    "PipelineDefinition",
    "RunFailed",
    "RunHandle",
    "RunRecord",
    "RunStatus",
    "StackSpec",
    "StepDefinition",
    "StepRecord",
    "StepStatus",
    "pipeline",
    "step",
]
