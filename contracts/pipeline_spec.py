"""A compiled pipeline: the DAG of step invocations that a run executes."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from conveyor.contracts.models import BlobRef, Frozen, Name

DEFAULT_POOL = "default"


class OutputSelector(Frozen):
    """One output of an upstream step invocation."""

    step: str
    output: str


InputBinding = OutputSelector | list[OutputSelector]
"""An input is one upstream output, or a list of them (a fan-in)."""


class StepSpec(Frozen):
    """One invocation of a step inside a pipeline."""

    name: Name = Field(description="Unique name of the invocation inside the pipeline")
    ref: str = Field(
        max_length=1000,
        description="Importable reference: 'package.module:function' or 'path/file.py:fn', "
        "a path relative to the root of the code archive",
    )
    inputs: dict[str, InputBinding] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list)
    retries: int = Field(default=0, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)
    pool: Name = DEFAULT_POOL
    allow_pickle: bool = False
    code: BlobRef | None = Field(
        default=None,
        description="The code archive that holds the step's source; None for a step of an "
        "installed package that workers trust",
    )

    @property
    def upstream(self) -> list[str]:
        """Names of the invocations whose outputs this one consumes, in first-use order."""
        seen: dict[str, None] = {}
        for binding in self.inputs.values():
            for selector in binding if isinstance(binding, list) else [binding]:
                seen.setdefault(selector.step, None)
        return list(seen)


class PipelineSpec(Frozen):
    """The DAG a pipeline function built, ready to run on any stack."""

    name: str
    ref: str | None = Field(default=None, description="Importable reference of the pipeline")
    parameters: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepSpec]
