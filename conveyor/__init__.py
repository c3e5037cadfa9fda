"""Conveyor: event-driven ML pipelines on stacks.

from conveyor import pipeline, step

@step
def make() -> int: return 41

@step
def inc(x: int) -> int: return x + 1

@pipeline
def p(): inc(make())

run = p()  # runs on the active stack
"""

from conveyor.contracts import (
    ArtifactRef,
    ConveyorError,
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
