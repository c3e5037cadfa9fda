"""The ``@pipeline`` decorator and the compiler that turns a pipeline function into a DAG.

Calling steps inside a pipeline function does not run them: each call records an
invocation and returns handles to its outputs, which later calls take as inputs.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, overload

from conveyor.contracts import (
    ConveyorError,
    InputBinding,
    Isolation,
    OutputSelector,
    PipelineSpec,
    RetryPolicy,
    StepSpec,
    ValidationError,
)
from conveyor.contracts.limits import MAX_STEPS
from conveyor.contracts.models import MAX_NAME_LENGTH, prevalidated
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

    __slots__ = ("_selector", "origin", "output", "step")

    def __init__(self, step: str, output: str, origin: object = None) -> None:
        self.step = step
        self.output = output
        self.origin = origin
        """The build that made the handle: another pipeline's handle is no input here."""
        self._selector: OutputSelector | None = None

    def selector(self) -> OutputSelector:
        # One selector per handle, shared by every step that reads it (a fan-out's
        # thousands); both names were checked when the upstream step was recorded.
        if self._selector is None:
            self._selector = prevalidated(
                OutputSelector, {"step": self.step, "output": self.output}, _SELECTOR_FIELDS
            )
        return self._selector

    def __repr__(self) -> str:
        return f"<output {self.output} of {self.step}>"

    def __bool__(self) -> bool:
        raise ConveyorError(
            "a step output is not known while the pipeline is built; branch inside a step"
        )


_SELECTOR_FIELDS = {"step", "output"}


class PipelineTooLarge(ValidationError):
    """A pipeline calls more steps than its compiler may record."""


class _Shape:
    """What every invocation of one step shares, checked once per compile: the StepSpec
    fields that come from the ``@step`` definition, and how its arguments bind."""

    def __init__(self, step: StepDefinition, *, cache: bool = True) -> None:
        # Each invocation copies it with its own name, inputs and parameters, which the
        # builder made and checked itself.
        self.template, self.fields = _template(
            step.name,
            step.ref,
            tuple(step.outputs),
            step.retries,
            step.retry,
            step.timeout,
            step.pool,
            step.allow_pickle,
            step.isolation,
            tuple(step.trust),
            code_digest(step.fn),
            step.cache and cache,
        )
        self.fields_set = self.template.model_fields_set | {"name", "inputs", "parameters"}
        parameters = step.signature.parameters.values()
        kinds = {p.kind for p in parameters}
        self.simple = not kinds & {
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
            inspect.Parameter.POSITIONAL_ONLY,
        }
        self.names = [p.name for p in parameters]
        self.positional = [
            p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        self.known = set(self.names)
        self.required = {p.name for p in parameters if p.default is inspect.Parameter.empty}
        self.last_inputs: dict[str, InputBinding] | None = None
        self.no_parameters: dict[str, Any] = {}

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The arguments by parameter name, in signature order, as ``Signature.bind``
        gives them; None when only ``Signature.bind`` can say (or what is wrong)."""
        if not self.simple or len(args) > len(self.positional):
            return None
        given = dict(zip(self.positional, args, strict=False))
        for key, value in kwargs.items():
            if key in given or key not in self.known:
                return None
            given[key] = value
        if not self.required <= given.keys():
            return None
        if not kwargs:
            return given
        return {name: given[name] for name in self.names if name in given}

    def spec(
        self, name: str, inputs: dict[str, InputBinding], parameters: dict[str, Any]
    ) -> StepSpec:
        if len(name) > MAX_NAME_LENGTH:  # a long base with a counter: let pydantic refuse it
            return StepSpec(**{**self.fields, "name": name})
        # Calls in a loop (a fan-out) often read the same handles as the call before: they
        # share that call's dict, as frozen models may (selectors hold only names, so equal
        # is the same). Parameters are shared only when empty: 1 == True, yet not in JSON.
        if inputs == self.last_inputs:
            inputs = self.last_inputs
        self.last_inputs = inputs
        if not parameters:
            parameters = self.no_parameters
        values = {**self.fields, "name": name, "inputs": inputs, "parameters": parameters}
        return prevalidated(StepSpec, values, self.fields_set)


@functools.lru_cache(maxsize=1024)
def _template(
    name: str,
    ref: str,
    outputs: tuple[str, ...],
    retries: int,
    retry: RetryPolicy,
    timeout: float | None,
    pool: str,
    allow_pickle: bool,
    isolation: Isolation | None,
    trust: tuple[str, ...],
    digest: str,
    cache: bool,
) -> tuple[StepSpec, dict[str, Any]]:
    """The StepSpec fields a step's definition gives, validated once for all the compiles
    that see the same definition and code (a pipeline submitted again and again), as a
    model and as a dict that invocations copy."""
    template = StepSpec(
        name=name,
        ref=ref,
        outputs=list(outputs),
        retries=retries,
        retry=retry,
        timeout_s=timeout,
        pool=pool,
        allow_pickle=allow_pickle,
        isolation=isolation,
        trust=list(trust),
        code_digest=digest,
        cache=cache,
    )
    return template, dict(template)


class _Builder:
    def __init__(self, pipeline: str, max_steps: int, *, cache: bool = True) -> None:
        self.steps: list[StepSpec] = []
        self.definitions: dict[str, StepDefinition] = {}
        self._counts: dict[str, int] = {}
        # A step function's code digest is taken once per compile (in its _Shape): a
        # helper redefined since (a notebook cell run again) must count.
        self._cache = cache
        self._taken: set[str] = set()
        self._shapes: dict[StepDefinition, _Shape] = {}
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
        name = base if count == 1 else f"{base}_{count}"
        if name in self._taken:  # step "f_2" beside the second call of step "f"
            raise ValidationError(f"pipeline {self._pipeline!r}: two steps are named {name!r}")
        self._taken.add(name)
        return name

    def _selector(self, name: str, handle: OutputHandle) -> OutputSelector:
        if handle.origin is not self:
            raise ValidationError(
                f"pipeline {self._pipeline!r}: step {name!r} reads output {handle.output!r} of "
                f"{handle.step!r}, which no earlier step of the pipeline has"
            )
        return handle.selector()

    def _shape(self, step: StepDefinition) -> _Shape:
        shape = self._shapes.get(step)
        if shape is None:
            shape = self._shapes[step] = _Shape(step, cache=self._cache)
            self.definitions[shape.template.ref] = step
        return shape

    def _arguments(
        self, step: StepDefinition, shape: _Shape, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        arguments = shape.bind(args, kwargs)
        if arguments is not None:
            return arguments
        try:
            bound = step.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ValidationError(f"step {step.name!r}: {exc}") from None
        for param in bound.arguments:
            kind = step.signature.parameters[param].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise ValidationError(f"step {step.name!r}: *args and **kwargs are not supported")
        return bound.arguments

    def record(self, step: StepDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # Stop at the limit, not after: a fan-out of millions would fill the memory first.
        if len(self.steps) >= self._max_steps:
            raise self.too_large()
        shape = self._shape(step)
        name = self._name(step.name)
        inputs: dict[str, InputBinding] = {}
        parameters: dict[str, Any] = {}
        for param, value in self._arguments(step, shape, args, kwargs).items():
            if isinstance(value, OutputHandle):
                inputs[param] = self._selector(name, value)
            elif (
                isinstance(value, list | tuple)
                and value
                and all(isinstance(v, OutputHandle) for v in value)
            ):
                inputs[param] = [self._selector(name, v) for v in value]
            else:
                _check_json(step.name, param, value)
                parameters[param] = value
        self.steps.append(shape.spec(name, inputs, parameters))
        outputs = shape.template.outputs
        if not outputs:
            return None
        if len(outputs) == 1:
            return OutputHandle(name, outputs[0], self)
        return tuple(OutputHandle(name, output, self) for output in outputs)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a pipeline builds: the objects of a large DAG
    (100,000 steps) would set off full collections that scan all of them again and again,
    which cost about as much as building them; whatever cycles it made are found after."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


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
            with _collector_paused():
                self.fn(*bound.args, **bound.kwargs)
        finally:
            building.reset(token)
        if builder.overflowed:  # the pipeline function caught the error and went on
            raise builder.too_large()
        if not builder.steps:
            raise ValidationError(f"pipeline {self.name!r} calls no step")
        # The steps were checked as they were recorded (unique names, inputs only from
        # steps before); validating them again as a PipelineSpec field would cost about
        # as much as building them (100,000 steps).
        head = PipelineSpec(
            name=self.name, ref=self.ref, folder=os.getcwd(), parameters=parameters, steps=[]
        )
        return head.model_copy(update={"steps": builder.steps}), builder.definitions

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
