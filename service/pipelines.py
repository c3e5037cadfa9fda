"""The ``@pipeline`` decorator and the compiler that turns a pipeline function into a DAG.

Calling steps inside a pipeline function does not run them: each call records an
invocation and returns handles to its outputs, which later calls take as inputs.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, overload

from conveyor.contracts import (
    ConveyorError,
    OutputSelector,
    PipelineSpec,
    StepSpec,
    ValidationError,
)
from conveyor.contracts.pipeline_spec import MAX_STEPS
from conveyor.service.code_digest import code_digest
from conveyor.service.pipeline_parameters import PipelineParameters
from conveyor.workers.steps import (
    MissingName,
    StepDefinition,
    building,
    load_reference,
    missing_name,
    reference_of,
)

if TYPE_CHECKING:
    from conveyor.service.handles import RunHandle


class OutputHandle:
    """A future output of a step invocation, usable as another step's input."""

    __slots__ = ("output", "step")

    def __init__(self, step: str, output: str) -> None:
        self.step = step
        self.output = output

    def selector(self) -> OutputSelector:
        return OutputSelector(step=self.step, output=self.output)

    def __repr__(self) -> str:
        return f"<output {self.output} of {self.step}>"

    def __bool__(self) -> bool:
        raise ConveyorError(
            "a step output is not known while the pipeline is built; branch inside a step"
        )


class PipelineTooLarge(ValidationError):
    """A pipeline calls more steps than its compiler may record."""


class _Builder:
    def __init__(self, pipeline: str, max_steps: int, *, cache: bool = True) -> None:
        self.steps: list[StepSpec] = []
        self.definitions: dict[str, StepDefinition] = {}
        self._counts: dict[str, int] = {}
        # Once per step function and compile: a helper redefined since (a notebook cell run
        # again) must count, so nothing is kept between compiles.
        self._digests: dict[int, str] = {}
        self._cache = cache
        self._pipeline = pipeline
        self._max_steps = max_steps
        self.overflowed = False

    def too_large(self) -> PipelineTooLarge:
        self.overflowed = True
        return PipelineTooLarge(
            f"pipeline {self._pipeline!r} has more than {self._max_steps} steps"
        )

    def _name(self, base: str) -> str:
        count = self._counts.get(base, 0) + 1
        self._counts[base] = count
        return base if count == 1 else f"{base}_{count}"

    def record(self, step: StepDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Stop at the limit, not after: a fan-out of millions would fill the memory first.
        if len(self.steps) >= self._max_steps:
            raise self.too_large()
        name = self._name(step.name)
        try:
            bound = step.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValidationError(f"step {step.name!r}: {exc}") from None
        inputs: dict[str, OutputSelector | list[OutputSelector]] = {}
        parameters: dict[str, Any] = {}
        for param, value in bound.arguments.items():
            kind = step.signature.parameters[param].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ValidationError(f"step {step.name!r}: *args and **kwargs are not supported")
            if isinstance(value, OutputHandle):
                inputs[param] = value.selector()
            elif (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(v, OutputHandle) for v in value)
            ):
                inputs[param] = [v.selector() for v in value]
            else:
                _check_json(step.name, param, value)
                parameters[param] = value
        ref = step.ref
        self.definitions[ref] = step
        digest = self._digests.get(id(step))
        if digest is None:
            digest = self._digests[id(step)] = code_digest(step.fn)
        self.steps.append(
            StepSpec(
                name=name,
                ref=ref,
                inputs=inputs,
                parameters=parameters,
                outputs=step.outputs,
                retries=step.retries,
                retry=step.retry,
                timeout_s=step.timeout,
                pool=step.pool,
                allow_pickle=step.allow_pickle,
                isolation=step.isolation,
                trust=list(step.trust),
                code_digest=digest,
                cache=step.cache and self._cache,
            )
        )
        handles = [OutputHandle(name, output) for output in step.outputs]
        if not handles:
            return None
        return handles[0] if len(handles) == 1 else tuple(handles)


def _check_json(step: str, param: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValidationError(
            f"step {step!r}: parameter {param!r} must be JSON-compatible or a step output, "
            f"got {type(value).__name__}"
        ) from None


class PipelineDefinition:
    """A function made into a pipeline; calling it runs it on the active stack."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        raise_on_failure: bool = True,
        cache: bool = True,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.raise_on_failure = raise_on_failure
        self.cache = cache
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self._parameters: PipelineParameters | None = None

    @property
    def parameters(self) -> PipelineParameters:
        """The pipeline's parameters, each with the validator of its annotation."""
        if self._parameters is None:
            self._parameters = PipelineParameters(self.name, self.fn)
        return self._parameters

    @property
    def ref(self) -> str:
        return reference_of(self.fn)

    def compile(self, *args: Any, **kwargs: Any) -> tuple[PipelineSpec, dict[str, StepDefinition]]:
        """Build the DAG with these pipeline parameters; also return the step definitions."""
        return self.compile_within(MAX_STEPS, args, kwargs)

    def compile_within(
        self, max_steps: int, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[PipelineSpec, dict[str, StepDefinition]]:
        """``compile``, refusing (PipelineTooLarge) a DAG of more than ``max_steps`` steps."""
        bound = self.parameters.bind(args, kwargs)
        parameters = dict(bound.arguments)
        for key, value in parameters.items():
            _check_json(self.name, key, value)
        builder = _Builder(self.name, max_steps, cache=self.cache)
        token = building.set(builder)
        try:
            self.fn(*bound.args, **bound.kwargs)
        finally:
            building.reset(token)
        if builder.overflowed:  # the pipeline function caught the error and went on
            raise builder.too_large()
        if not builder.steps:
            raise ValidationError(f"pipeline {self.name!r} calls no step")
        spec = PipelineSpec(
            name=self.name, ref=self.ref, parameters=parameters, steps=builder.steps
        )
        return spec, builder.definitions

    def with_options(
        self, *, raise_on_failure: bool = True, cache: bool | None = None
    ) -> PipelineDefinition:
        """This pipeline, called with other options: ``raise_on_failure=False`` returns the
        handle of a run that failed instead of raising ``RunFailed``; ``cache=False`` runs
        every step instead of reusing earlier outputs."""
        return PipelineDefinition(
            self.fn,
            name=self.name,
            raise_on_failure=raise_on_failure,
            cache=self.cache if cache is None else cache,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> RunHandle:
        """Run on the active stack, wait for the end, and return the run's handle.

        A run that fails or is cancelled raises ``RunFailed`` (naming the failed step, its
        error and traceback; ``.run`` is the handle), unless made with
        ``with_options(raise_on_failure=False)``.
        """
        from conveyor.service.handles import run_pipeline

        return run_pipeline(self, args, kwargs, raise_on_failure=self.raise_on_failure)

    def __repr__(self) -> str:
        return f"<pipeline {self.name} ({self.ref})>"


@overload
def pipeline(fn: Callable[..., Any], /) -> PipelineDefinition: ...


@overload
def pipeline(
    *, name: str | None = None, cache: bool = True
) -> Callable[[Callable[..., Any]], PipelineDefinition]: ...


def pipeline(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, cache: bool = True
) -> PipelineDefinition | Callable[[Callable[..., Any]], PipelineDefinition]:
    """Make a function a pipeline: its body calls steps, wiring outputs to inputs.
    ``cache=False`` runs every step each time (see docs/caching.md)."""

    def wrap(function: Callable[..., Any]) -> PipelineDefinition:
        return PipelineDefinition(function, name=name, cache=cache)

    return wrap(fn) if fn is not None else wrap


def load_pipeline(ref: str) -> PipelineDefinition:
    """The pipeline named by ``module:name`` or ``file.py:name``, with a clear error that
    suggests the pipelines of that module with a name close to a mistyped one."""
    try:
        obj = load_reference(ref)
    except MissingName as exc:
        pipelines = [k for k, v in exc.names.items() if isinstance(v, PipelineDefinition)]
        raise ConveyorError(
            missing_name(exc.where, exc.name, pipelines or list(exc.names), "pipeline")
        ) from None
    if not isinstance(obj, PipelineDefinition):
        raise ConveyorError(f"{ref!r} is a {type(obj).__name__}, not a @pipeline")
    return obj
