"""A compiled pipeline: the DAG of step invocations that a run executes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from conveyor.contracts.enums import Isolation
from conveyor.contracts.limits import (
    DEFAULT_MAX_RETRY_DELAY_S,
    MAX_BACKOFF,
    MAX_RETRIES,
    MAX_RETRY_DELAY_S,
    MAX_STEPS,
)
from conveyor.contracts.models import BlobRef, Frozen, Name

DEFAULT_POOL = "default"


CODE_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
"""A step's code digest: sha256 of its normalized source and what it uses."""


class RetryPolicy(Frozen):
    """How long a step waits before each of its retries.

    Retry ``n`` (1 for the first) waits ``delay_s * backoff ** (n - 1)`` seconds, at most
    ``max_delay_s``; with ``jitter``, a random part of that: between half and all of it
    ("equal jitter"), so that steps that failed together do not all come back together.
    """

    delay_s: float = Field(default=0.0, ge=0, le=MAX_RETRY_DELAY_S, allow_inf_nan=False)
    backoff: float = Field(default=2.0, ge=1, le=MAX_BACKOFF, allow_inf_nan=False)
    max_delay_s: float = Field(
        default=DEFAULT_MAX_RETRY_DELAY_S, ge=0, le=MAX_RETRY_DELAY_S, allow_inf_nan=False
    )
    jitter: bool = False


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
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    timeout_s: float | None = Field(default=None, gt=0)
    pool: Name = DEFAULT_POOL
    allow_pickle: bool = False
    # Left out of the JSON when empty, as isolation is.
    trust: list[Annotated[str, Field(max_length=500)]] = Field(
        default_factory=list,
        max_length=1000,
        exclude_if=lambda value: not value,
        description="Qualified names of types the step's inputs may build although their "
        "materializer does not trust them by default (skops)",
    )
    # Left out of the JSON when unset: workers from before the field still take the step.
    isolation: Isolation | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Where a sync body runs: 'thread' or 'process' (a child process, killed "
        "at the timeout); None for the worker's default",
    )
    # Left out of the JSON when unset, as ``isolation`` is.
    retry: RetryPolicy | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="The waits before retries; None retries at once",
    )
    code: BlobRef | None = Field(
        default=None,
        description="The code archive that holds the step's source; None for a step of an "
        "installed package that workers trust",
    )
    # Left out of the JSON when unset, as ``isolation`` is: workers never read it.
    code_digest: str | None = Field(
        default=None,
        pattern=CODE_DIGEST_PATTERN,
        exclude_if=lambda value: value is None,
        description="Digest of the step function's source and of the functions, classes and "
        "constants of user code it uses (the code part of its cache key); None: never cached",
    )
    # Left out of the JSON when true, the default.
    cache: bool = Field(
        default=True,
        exclude_if=lambda value: value,
        description="Whether the controller may complete the step from an earlier run's "
        "outputs of the same cache key",
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
    """The DAG a pipeline function built, ready to run on any stack.

    Steps come in an order where each reads only outputs of steps before it (the order a
    pipeline function calls them in), which also makes the graph acyclic.
    """

    name: Name
    ref: str | None = Field(
        default=None, max_length=1000, description="Importable reference of the pipeline"
    )
    folder: str | None = Field(
        default=None,
        max_length=4096,
        description="The working directory it was compiled in, where its reference is found "
        "(conveyor run retry compiles it there again)",
    )
    parameters: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepSpec] = Field(max_length=MAX_STEPS)

    @model_validator(mode="after")
    def _a_dag_in_call_order(self) -> PipelineSpec:
        problem = dag_problem(self.steps)
        if problem is not None:
            raise ValueError(problem)
        return self


def dag_problem(steps: list[StepSpec]) -> str | None:
    """Why ``steps`` are not a DAG in call order (each reads only outputs of steps before
    it, names unique); None if they are."""
    outputs: dict[str, list[str]] = {}
    for step in steps:
        if step.name in outputs:
            return f"two steps are named {step.name!r}"
        for binding in step.inputs.values():
            for selector in binding if isinstance(binding, list) else (binding,):
                if selector.output not in outputs.get(selector.step, ()):
                    return (
                        f"step {step.name!r} reads output {selector.output!r} of "
                        f"{selector.step!r}, which no earlier step of the pipeline has"
                    )
        outputs[step.name] = step.outputs
    return None
